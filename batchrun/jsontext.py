"""JSON that orjson refuses but that can still be read: the slow path only.

orjson (batchrun's parser) accepts only valid Unicode. Two kinds of text fail
it that a reader can still make sense of:

- a lone UTF-16 surrogate escape such as ``"\\ud83d"``: half of an emoji cut in
  two. It is valid JSON, and Python's ``json`` writes one for any string that
  holds half a surrogate pair, but it is not a character and cannot be sent as
  UTF-8;
- bytes that are not UTF-8 at all, in an answer from a server.

Both are read with U+FFFD (the replacement character) in place of what could
not be read. These functions are called only after orjson has failed, so the
usual path pays nothing for them.
"""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

__all__ = ["kind_of", "loads_answer", "loads_without_lone_surrogates"]

# Compiled on first use (re keeps it): compiling it at import cost 0.3 ms of
# start-up, for a path most runs never take.
_LONE_SURROGATE = "[\ud800-\udfff]"
_KINDS = {
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "true or false",
    type(None): "null",
    bytes: "binary data",
}


def kind_of(value: object) -> str:
    """What ``value`` is, in JSON's words (``a number``, not ``int``), for
    messages about input: a Parquet column may also hold ``binary data``."""
    return _KINDS.get(type(value), type(value).__name__)


def loads_without_lone_surrogates(text: str | bytes) -> Any:
    """The value of UTF-8 JSON text, each lone surrogate escape read as U+FFFD.

    Raises:
        ValueError: The text is not UTF-8, or not JSON for another reason
            (NaN and Infinity, which ``json`` allows, included).
    """
    value = json.loads(text)
    # json.loads joined every pair, so what is left in the range is alone.
    fixed = re.sub(_LONE_SURROGATE, "\ufffd", json.dumps(value, ensure_ascii=False))
    return orjson.loads(fixed)


def loads_answer(raw: bytes | str) -> Any:
    """A server's answer that orjson refused, read as far as it can be.

    Bytes that are not UTF-8 and lone surrogate escapes become U+FFFD: the
    answer was paid for, and its raw bytes are kept as they came.

    Raises:
        ValueError: It is not JSON even so.
    """
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return loads_without_lone_surrogates(text)
