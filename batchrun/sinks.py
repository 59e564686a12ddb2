"""Write results durably: Parquet part files, the usage table and the manifest.

Every file appears atomically (written to a temp file, then ``os.replace``d),
so ``OUT`` stays readable whatever stops the process. This module owns the
results schema. It does not decide *when* to flush; the runner does.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ConfigError, OutputError
from .records import Result

__all__ = [
    "RESULTS_DIR",
    "RESULT_SCHEMA",
    "USAGE_SCHEMA",
    "PartWriter",
    "infer_type",
    "prepare_output",
    "write_json",
    "write_usage",
]

RESULTS_DIR = "results"
USAGE_FILE = "usage.parquet"
MANIFEST_FILE = "manifest.json"

_TS = pa.timestamp("us", tz="UTC")
_CHOICE = pa.struct(
    [("index", pa.int64()), ("text", pa.string()), ("finish_reason", pa.string())]
)
RESULT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("status", pa.string()),
        ("endpoint", pa.string()),
        ("model", pa.string()),
        ("prompt", pa.string()),
        ("completion", pa.string()),
        ("choices", pa.list_(_CHOICE)),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("total_tokens", pa.int64()),
        ("response", pa.string()),
        ("http_status", pa.int64()),
        ("attempts", pa.int64()),
        ("latency_s", pa.float64()),
        ("error", pa.string()),
        ("started_at", _TS),
        ("finished_at", _TS),
    ]
)
USAGE_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("endpoint", pa.string()),
        ("requests", pa.int64()),
        ("succeeded", pa.int64()),
        ("failed", pa.int64()),
        ("attempts", pa.int64()),
        ("retries", pa.int64()),
        ("rate_limited", pa.int64()),
        ("server_errors", pa.int64()),
        ("timeouts", pa.int64()),
        ("prompt_tokens", pa.int64()),
        ("completion_tokens", pa.int64()),
        ("total_tokens", pa.int64()),
        ("wall_s", pa.float64()),
        ("requests_per_s", pa.float64()),
        ("completion_tokens_per_s", pa.float64()),
        ("latency_p50_s", pa.float64()),
        ("latency_p90_s", pa.float64()),
        ("latency_p99_s", pa.float64()),
    ]
)


def infer_type(kinds: Iterable[type]) -> pa.DataType:
    """The Arrow type for a kept input column, from the Python types of its values.

    Mixed int and float become float64; anything else mixed, or nested, is
    stored as JSON text so that every part file shares one schema.
    """
    found = {k for k in kinds if k is not type(None)}
    if found == {bool}:
        return pa.bool_()
    if found == {int}:
        return pa.int64()
    if found and found <= {int, float}:
        return pa.float64()
    return pa.string()


def _to_column(values: list[object], type_: pa.DataType) -> list[object]:
    if type_ == pa.string():
        return [
            v if v is None or isinstance(v, str) else orjson.dumps(v).decode()
            for v in values
        ]
    if type_ == pa.float64():
        return [None if v is None else float(v) for v in values]  # type: ignore[arg-type]
    return values


def result_schema(kept: Mapping[str, pa.DataType]) -> pa.Schema:
    """``RESULT_SCHEMA`` plus kept input columns (``input_<name>`` on a clash)."""
    fields = list(RESULT_SCHEMA)
    taken = set(RESULT_SCHEMA.names)
    for name, type_ in kept.items():
        fields.append(pa.field(kept_name(name, taken), type_))
    return pa.schema(fields)


def kept_name(name: str, taken: Iterable[str] = RESULT_SCHEMA.names) -> str:
    """The results column that holds the kept input column ``name``."""
    return f"input_{name}" if name in set(taken) else name


class PartWriter:
    """Buffers results as columns and writes them as numbered part files.

    ``add`` runs on the event loop and is cheap; ``take`` hands the buffer over
    and ``write`` (blocking, run it in a thread) turns it into a part file.

    Args:
        results_dir: ``OUT/results``.
        kept: Kept input columns and their Arrow types, in output order.
        raw_response: Keep the raw response body.
        first_part: The number of the first part to write.
    """

    def __init__(
        self,
        results_dir: Path,
        *,
        kept: Mapping[str, pa.DataType] | None = None,
        raw_response: bool = True,
        first_part: int = 0,
    ) -> None:
        self.results_dir = results_dir
        self._kept = dict(kept or {})
        self.schema = result_schema(self._kept)
        self._raw = raw_response
        self._next_part = first_part
        self._rows: list[Result] = []

    @property
    def pending(self) -> int:
        """Results added but not yet taken."""
        return len(self._rows)

    def add(self, results: Sequence[Result]) -> None:
        """Buffer results."""
        self._rows.extend(results)

    def take(self) -> tuple[int, list[Result]]:
        """Hand over the buffered results with the part number they will get."""
        rows, self._rows = self._rows, []
        number = self._next_part
        self._next_part += 1
        return number, rows

    def table(self, rows: Sequence[Result]) -> pa.Table:
        """The results as an Arrow table of ``self.schema``."""
        columns: dict[str, list[Any]] = {
            "id": [r.id for r in rows],
            "status": [r.status for r in rows],
            "endpoint": [r.endpoint for r in rows],
            "model": [r.model for r in rows],
            "prompt": [r.prompt for r in rows],
            "completion": [r.completion for r in rows],
            "choices": [r.choices for r in rows],
            "finish_reason": [r.finish_reason for r in rows],
            "prompt_tokens": [r.usage.prompt_tokens for r in rows],
            "completion_tokens": [r.usage.completion_tokens for r in rows],
            "total_tokens": [r.usage.total_tokens for r in rows],
            "response": [r.response for r in rows] if self._raw else [None] * len(rows),
            "http_status": [r.http_status for r in rows],
            "attempts": [r.attempts for r in rows],
            "latency_s": [r.latency_s for r in rows],
            "error": [r.error for r in rows],
            "started_at": [int(r.started_at * 1_000_000) for r in rows],
            "finished_at": [int(r.finished_at * 1_000_000) for r in rows],
        }
        arrays = []
        for field in RESULT_SCHEMA:
            values = columns[field.name]
            if field.type == _TS:
                arrays.append(pa.array(values, pa.int64()).cast(_TS))
            else:
                arrays.append(pa.array(values, field.type))
        for name, type_ in self._kept.items():
            values = [None if r.extra is None else r.extra.get(name) for r in rows]
            arrays.append(pa.array(_to_column(values, type_), type_))
        return pa.Table.from_arrays(arrays, schema=self.schema)

    def write(self, number: int, rows: Sequence[Result]) -> Path:
        """Write one part file atomically. Blocking.

        Raises:
            OutputError: The file cannot be written.
        """
        path = self.results_dir / f"part-{number:05d}.parquet"
        atomic_write(path, lambda tmp: pq.write_table(self.table(rows), tmp))
        return path


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Write via a temp file in the same directory, then rename over ``path``.

    Raises:
        OutputError: Writing or renaming failed; ``path`` is unchanged.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, pa.ArrowException) as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc}") from exc


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write a JSON document atomically."""
    text = json.dumps(data, indent=2, sort_keys=False, default=str) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_usage(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write the usage table atomically."""
    table = pa.Table.from_pylist(list(rows), schema=USAGE_SCHEMA)
    atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def prepare_output(out_dir: Path, *, overwrite: bool) -> Path:
    """Create ``OUT`` and ``OUT/results``; refuse to mix with earlier results.

    Returns:
        The results directory.

    Raises:
        OutputError: The directory cannot be created or written.
        ConfigError: ``OUT`` holds results and ``overwrite`` is false.
    """
    results = out_dir / RESULTS_DIR
    earlier = (out_dir / MANIFEST_FILE).exists() or (
        results.is_dir() and any(results.iterdir())
    )
    if earlier and not overwrite:
        raise ConfigError(
            f"{out_dir} already holds results; pass --overwrite to replace them"
        )
    try:
        if earlier:
            if results.exists():
                shutil.rmtree(results)
            for name in (USAGE_FILE, MANIFEST_FILE):
                (out_dir / name).unlink(missing_ok=True)
        results.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".batchrun-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"cannot write to {out_dir}: {exc.strerror or exc}") from exc
    return results
