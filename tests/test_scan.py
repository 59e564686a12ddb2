"""The validation pass (``batchrun.scan``) on its own."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from batchrun.config import RequestOptions
from batchrun.payload import RequestBuilder
from batchrun.scan import ScanStopped, scan_inputs

from .helpers import prompts, write_jsonl


def test_scan_counts_rows_and_stops_when_told(tmp_path: Path) -> None:
    """A scan counts every row; with its stop event set it ends at the next
    batch, so a Ctrl-C during a long scan does not wait for the whole input."""
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(3000))
    builder = RequestBuilder(RequestOptions(model="m"))
    assert scan_inputs([inp], builder).total == 3000
    stop = threading.Event()
    stop.set()
    with pytest.raises(ScanStopped):
        scan_inputs([inp], builder, stop=stop)
