"""Errors caused by input or configuration, which entry points report as one line, no traceback."""
from cdpo.distributed import ScalingError
from cdpo.generation_vllm import VLLMUnavailableError
from cdpo.io import DataError
from cdpo.models.adapters import AdapterMismatchError
from cdpo.models.embedded import EmbeddedModelMissingError
from cdpo.models.loading import OfflineHubError, QuantizationUnavailableError
from cdpo.pipeline.select import EmptySelectionError

USER_ERRORS = (DataError, EmptySelectionError, AdapterMismatchError, EmbeddedModelMissingError, OfflineHubError,
               QuantizationUnavailableError, FileNotFoundError, ScalingError, VLLMUnavailableError)
