"""Fused output-head kernels for cDPO: token log-probs (of a preference pair batch in one call),
contrastive scoring and TDPO's sequential KL, all without materialising [N, V] logits.

Every function takes hidden states [B, T, H], the head weight [V, H] (optional bias [V]) and a
[B, T] mask, and a ``backend`` ("auto" | "triton" | "torch"; None = the process default set by
:func:`set_backend`). "auto" runs Triton kernels on CUDA and the chunked torch path elsewhere.
"""

from .backend import BACKENDS, get_backend, resolve, set_backend, use_backend
from .contrastive import contrastive_token_probs
from .kl import SequentialKLFunction, sequential_kl, sequential_kl_and_logprobs
from .logprob import LinearLogprobFunction, linear_logprobs, token_logprobs, weighted_logprob_sums
from .preference import policy_logprobs_pair

__all__ = [
    "BACKENDS",
    "LinearLogprobFunction",
    "SequentialKLFunction",
    "contrastive_token_probs",
    "get_backend",
    "linear_logprobs",
    "policy_logprobs_pair",
    "resolve",
    "sequential_kl",
    "sequential_kl_and_logprobs",
    "set_backend",
    "token_logprobs",
    "use_backend",
    "weighted_logprob_sums",
]
