"""Tests for ``batchrun.records``: reading a response's usage."""

from __future__ import annotations

from typing import Any

import pytest

from batchrun.records import Usage


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"usage": {"prompt_tokens": 4, "completion_tokens": 16, "total_tokens": 20}},
         Usage(4, 16, 20)),
        ({"choices": []}, Usage(None, None, None)),
        ({"usage": None}, Usage(None, None, None)),
        ({"usage": [4, 16, 20]}, Usage(None, None, None)),
        ({"usage": {"prompt_tokens": 3}}, Usage(3, None, None)),
        # JSON true is not a count, nor is a float or a string.
        ({"usage": {"prompt_tokens": True, "completion_tokens": 2.0,
                    "total_tokens": 7}}, Usage(None, None, 7)),
        ({"usage": {"prompt_tokens": 1, "completion_tokens": 2,
                    "total_tokens": "3"}}, Usage(1, 2, None)),
        ({"usage": {"prompt_tokens": False, "completion_tokens": False,
                    "total_tokens": False}}, Usage(None, None, None)),
    ],
)  # fmt: skip
def test_usage_keeps_only_integer_counts(body: dict[str, Any], expected: Usage) -> None:
    """Only integers count as tokens; anything else the server sends is None."""
    assert Usage.from_response(body) == expected
