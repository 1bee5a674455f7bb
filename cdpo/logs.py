"""Logging helpers for the entry points' Hydra logging configs (conf/hydra/job_logging/)."""
from __future__ import annotations

import logging


class NotPrintedByItsLibrary(logging.Filter):
    """For the console handler on the root logger: drops a record that a handler below the root has
    handled already. huggingface_hub and datasets give their top logger a stderr handler at import and
    still propagate to the root, so each of their warnings would show twice (the log file keeps it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        logger = logging.getLogger(record.name)
        while logger.parent is not None:  # up to, not including, the root
            if any(not isinstance(h, logging.NullHandler) for h in logger.handlers):
                return False
            if not logger.propagate:
                break
            logger = logger.parent
        return True
