"""Flatten nested run configs into tracking params, dropping anything credential-like.

No mlflow import; the limits mirror MLflow's (mlflow.utils.validation)."""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any

MAX_KEY_LENGTH = 250
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000

# Key names that may hold a credential: `token` as a name or suffix (`token`, `hf_token`,
# `auth_token`), not counts of tokens or tokenizers (`eval_tokens`, `max_tokens`,
# `tokens_per_s`, `tokenizer`), which language-model configs and metrics use.
SECRET_KEY = re.compile(
    r"secret|token(?!s|i[sz])|password|passwd|credential|api[_-]?key|access[_-]?key",
    re.IGNORECASE,
)
# Values in the shape of well-known credentials, whatever the key is called.
_SECRET_VALUE = re.compile(
    r"^\s*(sk-[A-Za-z0-9_\-]{20,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}"
    r"|hf_[A-Za-z0-9]{20,}|xox[abprs]-[A-Za-z0-9\-]{10,}|AKIA[0-9A-Z]{16}|glpat-[\w\-]{20,})"
)
_URL_PASSWORD = re.compile(r"(://[^/\s:@]+:)[^/\s@]+@")
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- ]")


def is_secret_key(key: str) -> bool:
    """True when a key name looks like it holds a credential."""
    return SECRET_KEY.search(key) is not None


def is_secret_value(value: str) -> bool:
    """True when a string has the shape of a known API token or access key."""
    return _SECRET_VALUE.match(value) is not None


def redact_url_password(value: str) -> str:
    """`scheme://user:pass@host` -> `scheme://user:***@host`."""
    return _URL_PASSWORD.sub(r"\1***@", value)


def clean_key(key: str) -> str:
    """A key MLflow accepts: allowed characters only, no `.`/`..`/empty path parts, <= 250 chars."""
    key = _BAD_KEY_CHARS.sub("_", key)
    parts = [p if p not in ("", ".", "..") else "_" for p in key.split("/")]
    return "/".join(parts)[:MAX_KEY_LENGTH] or "_"


def _to_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, PurePath):
        return value.as_posix()
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else list(value)
        return json.dumps(items, default=str, allow_nan=True)
    return str(value)


def clean_value(value: Any, limit: int = MAX_PARAM_VALUE_LENGTH) -> str | None:
    """Text form of `value`, None when it looks like a credential, cut to `limit` characters."""
    text = _to_text(value)
    if is_secret_value(text):
        return None
    text = redact_url_password(text)
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return text


def flatten_params(
    d: Mapping[str, Any] | Any,
    sep: str = ".",
    *,
    dropped: list[str] | None = None,
    prefix: str = "",
) -> dict[str, str]:
    """Flatten nested mappings (and dataclasses) to `{"a.b.c": "value"}` string params.

    Lists, tuples and sets become their JSON string. Keys whose name matches `SECRET_KEY` are
    dropped with their whole subtree, as are values shaped like credentials; the dropped key
    names (never values) are appended to `dropped` when given."""
    if dataclasses.is_dataclass(d) and not isinstance(d, type):
        d = dataclasses.asdict(d)
    out: dict[str, str] = {}
    for raw_key, value in d.items():
        key = f"{prefix}{sep}{raw_key}" if prefix else str(raw_key)
        if is_secret_key(str(raw_key)):
            if dropped is not None:
                dropped.append(key)
            continue
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping):
            out.update(flatten_params(value, sep, dropped=dropped, prefix=key))
            continue
        text = clean_value(value)
        if text is None:
            if dropped is not None:
                dropped.append(key)
            continue
        out[clean_key(key)] = text
    return out
