"""JSON as RFC 8259 has it, for what comes from outside (clients, peers, the LLM): no NaN or Infinity, which
Python's parser takes (as it takes 1e999 for infinity) and no database or strict peer does, and no lone surrogate escape ("\\ud800"), which
parses into text that cannot be written as UTF-8 (so not stored, nor sent on)."""

from __future__ import annotations

import json
import math
import re
from typing import Any

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def loads(data: str | bytes) -> Any:
    """`json.loads`, refusing what is not JSON by the RFC with a ValueError."""
    value = json.loads(data, parse_constant=_not_json, parse_float=_finite)
    raw = data.encode(errors="surrogatepass") if isinstance(data, str) else data
    if _SURROGATE_ESCAPE.search(raw):  # rare: only then is the text looked at whole (a surrogate pair is fine)
        try:
            json.dumps(value, ensure_ascii=False).encode()
        except UnicodeEncodeError as error:
            raise ValueError(f"text that is not Unicode: a lone surrogate {error.object[error.start:error.end]!r}") from error
    return value


def _finite(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise ValueError(f"{text[:20]} is beyond a double")
    return number


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON number")
