"""Whether the Hugging Face hub can be used now, asked in seconds: the offline variables, a short TCP
probe of the endpoint, the local hub cache. An unreachable hub otherwise costs about a minute per
file (huggingface_hub retries each request five times) before a long traceback; data sources and
model loading ask here first. Imports nothing heavy (huggingface_hub only for the cache lookup).
"""
from __future__ import annotations

import os
import socket
import threading
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0


def offline_env(*also: str) -> bool:
    """HF_HUB_OFFLINE, or one of `also` (HF_DATASETS_OFFLINE, TRANSFORMERS_OFFLINE), is set. Read at call
    time: huggingface_hub reads it once at import."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", *also))


def endpoint() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """TCP probe of the hub in a daemon thread, so a hanging DNS lookup cannot block us either. Behind a proxy
    (where a cluster's only way out may be one) a direct probe proves nothing: the hub is assumed reachable."""
    if any(os.environ.get(k) for k in PROXY_VARIABLES):
        return True
    ok: list[bool] = []

    def probe():
        try:
            socket.create_connection(endpoint(), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout + 0.5)
    return bool(ok)


def unavailable(*also: str) -> str | None:
    """Why the hub cannot be used now, or None when it can."""
    if offline_env(*also):
        return "offline: " + "/".join(("HF_HUB_OFFLINE", *also)) + " is set"
    if not reachable():
        host, port = endpoint()
        return f"{host}:{port} did not answer within {PROBE_TIMEOUT_S:g} s"
    return None


def cached(repo_id: str, filename: str = "config.json") -> bool:
    """`filename` of hub repo `repo_id` is in the local hub cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, filename), str)
