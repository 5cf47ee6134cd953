"""Bounded network behaviour for optlab's own MLflow calls. No mlflow import here.

MLflow's REST client retries a failed request with exponential backoff for minutes by default
(`MLFLOW_HTTP_REQUEST_MAX_RETRIES=7`, `..._BACKOFF_FACTOR=2`, `..._TIMEOUT=120`). It reads those
variables on every request (`mlflow.utils.rest_utils.http_request`), both for the tracking API
and for proxied artifact uploads, so `bounded_http()` sets them for the duration of optlab's
own calls only and restores them afterwards. Training then notices an outage in about two
seconds (connection refused) or `timeout * (retries + 1)` seconds (a hung server), and spools.

Tuning: `OPTLAB_TRACKING_RETRIES` (default 2) and `OPTLAB_TRACKING_TIMEOUT_S` (default 10).
"""

from __future__ import annotations

import contextlib
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from urllib.parse import urlparse, urlunparse

DEFAULT_RETRIES = 2
DEFAULT_TIMEOUT_S = 10
PROBE_TIMEOUT_S = 2.0

_ENV_RETRIES = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
_ENV_BACKOFF = "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"
_ENV_JITTER = "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER"
_ENV_TIMEOUT = "MLFLOW_HTTP_REQUEST_TIMEOUT"

# os.environ is process-wide: one optlab call at a time changes it (re-entrant for nesting).
_LOCK = threading.RLock()
_depth = 0
_saved: dict[str, str | None] = {}


def _int_env(name: str, default: int, low: int, high: int) -> int:
    try:
        value = int(os.environ.get(name, default))
    except ValueError:
        return default
    return max(low, min(high, value))


def http_settings(retries: int | None = None, timeout_s: int | None = None) -> dict[str, str]:
    """The MLflow HTTP variables optlab uses for its own calls."""
    if retries is None:
        retries = _int_env("OPTLAB_TRACKING_RETRIES", DEFAULT_RETRIES, 0, 10)
    if timeout_s is None:
        timeout_s = _int_env("OPTLAB_TRACKING_TIMEOUT_S", DEFAULT_TIMEOUT_S, 1, 600)
    return {
        _ENV_RETRIES: str(max(0, int(retries))),
        _ENV_BACKOFF: "1",  # urllib3 waits 0 s, then 2 s, 4 s ... (an int in MLflow)
        _ENV_JITTER: "0.5",
        _ENV_TIMEOUT: str(max(1, int(timeout_s))),
    }


@contextlib.contextmanager
def bounded_http(retries: int | None = None, timeout_s: int | None = None) -> Iterator[None]:
    """Within the block, MLflow HTTP requests retry `retries` times with a short backoff and
    time out after `timeout_s` seconds. Nested blocks keep the outermost settings. Other threads
    of the process that call MLflow while a block is open see the same settings."""
    global _depth
    with _LOCK:
        if _depth == 0:
            settings = http_settings(retries, timeout_s)
            _saved.clear()
            for key, value in settings.items():
                _saved[key] = os.environ.get(key)
                os.environ[key] = value
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
            if _depth == 0:
                for key, old in _saved.items():
                    if old is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = old
                _saved.clear()


def is_http(uri: str) -> bool:
    return urlparse(uri).scheme in ("http", "https")


def reachable(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Quick check that a tracking server answers (`GET <uri>/health`; any answer below 500 counts).
    Always True for non-HTTP stores (sqlite, file), whose failures show on first use."""
    if not is_http(uri):
        return True
    parsed = urlparse(uri)
    netloc = parsed.hostname or ""
    if ":" in netloc:  # IPv6 literal
        netloc = f"[{netloc}]"
    if parsed.port:
        netloc = f"{netloc}:{parsed.port}"
    url = urlunparse((parsed.scheme, netloc, parsed.path.rstrip("/") + "/health", "", "", ""))
    try:
        with urllib.request.urlopen(url, timeout=timeout_s):  # noqa: S310 (http/https only)
            return True
    except urllib.error.HTTPError as exc:  # it answered; 5xx: a proxy whose backend is down
        return exc.code < 500
    except (OSError, ValueError):  # refused, unreachable, timed out, bad URL
        return False
