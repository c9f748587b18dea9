"""The Hugging Face hub as seen from this machine: before a hub id is loaded, whether the hub can be
reached at all; where it cannot (no network, no DNS), the process switches the libraries to
offline mode, so they read their local caches at once instead of retrying the network for tens
of seconds, and a model or dataset that is not cached fails with one clear message.

Skipped where the user decided already (``HF_HUB_OFFLINE`` set) or where a proxy carries the
traffic (a direct connection proves nothing there).
"""

from __future__ import annotations

import os
import sys
import threading
from urllib.parse import urlparse

PROBE_SECONDS = 3.0  # a connection that has not opened by then counts as unreachable
PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")
_OFFLINE_BY_US: list[str] = []  # the host found unreachable, once per process


def _endpoint() -> tuple[str, int]:
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)


def _reachable(host: str, port: int, timeout: float = PROBE_SECONDS) -> bool:
    """Whether a TCP connection to host:port opens within ``timeout`` seconds (name lookup included,
    in a thread, since a hanging resolver has no timeout of its own)."""
    import socket

    opened: list[bool] = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            opened.append(True)
        except OSError:
            opened.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(opened and opened[0])


def offline_unless_reachable() -> bool:
    """Call before loading a hub id. Returns whether the hub was found unreachable (this call or an
    earlier one), offline mode then being on for the rest of the process."""
    if _OFFLINE_BY_US:
        return True
    if os.environ.get("HF_HUB_OFFLINE") or any(os.environ.get(v) for v in PROXY_VARIABLES):
        return False
    host, port = _endpoint()
    if _reachable(host, port):
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"
    for module, name in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE")):
        if module in sys.modules:  # read from the environment when imported: already imported, set it too
            setattr(sys.modules[module], name, True)
    _OFFLINE_BY_US.append(host)
    return True


def unreachable_hint() -> str:
    """What to add to a loading error when the hub was found unreachable ('' otherwise)."""
    if not _OFFLINE_BY_US:
        return ""
    return (f" ({_OFFLINE_BY_US[0]} cannot be reached from this machine, so only the local Hugging Face cache "
            "was searched; check the name, or download it where there is a network)")


def missing_files_reason(exc: Exception) -> str:
    """The reason to give for a load that found files missing: with the hub unreachable, that it is
    not in the local cache (the libraries' own text is about connecting); else the library's."""
    if _OFFLINE_BY_US and isinstance(exc, OSError):
        return (f"not in the local Hugging Face cache, and {_OFFLINE_BY_US[0]} cannot be reached from this machine "
                "(check the name, or download it where there is a network)")
    return str(exc) + unreachable_hint()
