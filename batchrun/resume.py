"""Resume: may ``OUT`` be continued, what is already done there, and where a
run stands (``batchrun status``).

A run records in ``manifest.json`` the fingerprint of its request-shaping
options and of its input files. Running the same command again continues the
same output: rows already ``ok`` (with an unchanged request) are skipped,
failed rows are retried unless ``--skip-failed``, unreached rows run. A
different fingerprint is refused, naming what changed. This module reads; it
never writes results.
"""

from __future__ import annotations

import hashlib
import json
import os
from array import array
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from .config import RunConfig
from .errors import ConfigError
from .journal import JOURNAL_DIR, read_segment, segments
from .sinks import (
    MANIFEST_FILE,
    RESULTS_DIR,
    OutputLock,
    key_of,
    latest_rows,
    list_parts,
    read_parts,
    row_keys,
)
from .stats import ErrorTally, StatsCollector, no_usage_line

__all__ = [
    "CompletedIndex",
    "check_compatible",
    "input_fingerprint",
    "load_manifest",
    "request_fingerprint",
    "status_report",
]

_HEAD_BYTES = 1 << 16


def request_fingerprint(config: RunConfig) -> dict[str, Any]:
    """The options that decide what is sent and how results are shaped.

    The input paths are part of it (resolved, so a relative and an absolute
    spelling agree): another input is another job. The inputs' contents are
    not: with an id column, rows added or edited since are simply run.
    """
    return {
        **config.request.shaping(),
        "keep_columns": list(config.request.keep_columns),
        "inputs": [str(p.resolve()) for p in config.inputs],
    }


def input_fingerprint(files: Sequence[Path]) -> list[dict[str, Any]]:
    """Size, modification time and a hash of the first 64 KiB of each input."""
    found = []
    for path in files:
        stat = path.stat()
        with path.open("rb") as handle:
            head = hashlib.blake2b(handle.read(_HEAD_BYTES), digest_size=16).hexdigest()
        found.append(
            {
                "path": str(path),
                "size": stat.st_size,
                "mtime_ns": stat.st_mtime_ns,
                "head": head,
            }
        )
    return found


def load_manifest(out_dir: Path) -> dict[str, Any] | None:
    """The manifest of an earlier run into ``out_dir``, or None.

    Raises:
        ConfigError: It exists but cannot be read.
    """
    path = out_dir / MANIFEST_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return None  # nothing there yet, or OUT is not a directory at all
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"cannot read {path} ({exc}); pass --overwrite to start afresh"
        ) from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a batchrun manifest; pass --overwrite")
    return data


def check_compatible(
    manifest: dict[str, Any],
    fingerprint: dict[str, Any],
    inputs: list[dict[str, Any]],
    *,
    positional: bool,
    out_dir: Path,
) -> None:
    """Refuse to continue an output made with other request options.

    Raises:
        ConfigError: Naming each option that changed, or the input file that
            changed while row positions are the ids.
    """
    old = manifest.get("fingerprint")
    if not isinstance(old, dict):
        raise ConfigError(f"{out_dir} has no request fingerprint; pass --overwrite")
    changed = [
        f"{key} was {old.get(key)!r}, now {fingerprint.get(key)!r}"
        for key in sorted(set(old) | set(fingerprint))
        if old.get(key) != fingerprint.get(key)
    ]
    if changed:
        raise ConfigError(
            f"{out_dir} was written with other request options ({'; '.join(changed)});"
            " run with the same options to resume, or pass --overwrite to start afresh"
        )
    if positional and manifest.get("input_files") != inputs:
        before = {item.get("path"): item for item in manifest.get("input_files", [])}
        culprit = next(
            (item["path"] for item in inputs if before.get(item["path"]) != item),
            inputs[0]["path"] if inputs else "the input",
        )
        raise ConfigError(
            f"input {culprit} changed since {out_dir} was written, and its rows have"
            " no id column, so row positions no longer identify rows; add an id"
            " column (or --id-column) to resume, or pass --overwrite"
        )


@dataclass(frozen=True, slots=True)
class Prior:
    """An id's latest result in the output."""

    ok: bool
    request_hash: int


def _keys(row_id: str) -> tuple[int, int]:
    # Two independently salted 64-bit string hashes: a false match needs both
    # to collide (about 2**-128), and each costs a fraction of a microsecond.
    return hash(row_id), hash(row_id + "\x1f")


def _int64s(values: array[int]) -> pa.Array:
    """An Arrow view of an ``array('q')`` without copying it."""
    return pa.Array.from_buffers(pa.int64(), len(values), [None, pa.py_buffer(values)])


def _to_array(values: pa.Array) -> array[int]:
    """A compact ``array('q')`` copy of an Arrow int64 array."""
    out = array("q")
    for chunk in range(0, len(values), 65536):
        out.extend(values.slice(chunk, 65536).to_pylist())
    return out


class CompletedIndex:
    """The latest result of every id in ``OUT/results``, ~25 bytes per id.

    Args:
        results_dir: ``OUT/results``, with every journal segment already
            rolled into parts.
    """

    def __init__(self, results_dir: Path) -> None:
        import pyarrow.compute as pc  # deferred: 60 ms of start-up otherwise

        first, second, hashes = array("q"), array("q"), array("q")
        oks = bytearray()
        wanted = ["id", "variant", "status", "request_hash"]
        for table in read_parts(results_dir, wanted):
            for key, status, digest in zip(
                row_keys(table).to_pylist(),
                table.column("status").to_pylist(),
                table.column("request_hash").to_pylist(),
                strict=True,
            ):
                a, b = _keys(key)
                first.append(a)
                second.append(b)
                hashes.append(digest or 0)
                oks.append(status == "ok")
        columns = {"a": _int64s(first), "b": _int64s(second)}
        # A stable sort by key keeps each id's occurrences in write order, so
        # the last of each run of equal keys is the id's latest result.
        order = pc.sort_indices(
            pa.table(columns), sort_keys=[("a", "ascending"), ("b", "ascending")]
        )
        a_sorted = columns["a"].take(order)
        b_sorted = columns["b"].take(order)
        if len(order):
            differs = pc.or_(
                pc.not_equal(a_sorted[:-1], a_sorted[1:]),
                pc.not_equal(b_sorted[:-1], b_sorted[1:]),
            )
            last = pa.concat_arrays([differs, pa.array([True])])
        else:
            last = pa.array([], pa.bool_())
        keep = order.filter(last)
        self._a = _to_array(a_sorted.filter(last))
        self._b = _to_array(b_sorted.filter(last))
        self._hash = _to_array(_int64s(hashes).take(keep))
        self._ok = bytearray(pc.take(pa.array(oks, pa.uint8()), keep).to_pylist())

    def __len__(self) -> int:
        return len(self._a)

    def lookup(self, row_id: str, variant: str | None = None) -> Prior | None:
        """The latest result for ``row_id`` (in ``variant``), if there is one."""
        a, b = _keys(key_of(row_id, variant))
        keys = self._a
        i = bisect_left(keys, a)
        while i < len(keys) and keys[i] == a:
            if self._b[i] == b:
                return Prior(bool(self._ok[i]), self._hash[i])
            i += 1
        return None


def _latest_statuses(
    out_dir: Path, parts_through: int, errors: ErrorTally
) -> dict[str | None, list[int]]:
    """[ok, failed] per sweep variant (None: no sweep), latest result winning;
    the failed rows' errors go into ``errors``."""
    columns = ("id", "variant", "status", "error")
    tables: list[pa.Table] = list(read_parts(out_dir / RESULTS_DIR, list(columns)))
    for number, path in segments(out_dir / JOURNAL_DIR):
        if number > parts_through:
            rows = list(read_segment(path))
            tables.append(
                pa.table(
                    {
                        name: pa.array([r.get(name) for r in rows], pa.string())
                        for name in columns
                    }
                )
            )
    counts: dict[str | None, list[int]] = {}
    if not tables:
        return counts
    table = pa.concat_tables(tables)
    keys = pa.chunked_array([row_keys(t) for t in tables], pa.string())
    latest = table.take(latest_rows(keys))
    for variant, status in zip(
        latest.column("variant").to_pylist(),
        latest.column("status").to_pylist(),
        strict=True,
    ):
        counts.setdefault(variant, [0, 0])[0 if status == "ok" else 1] += 1
    errors.add_errors(latest.column("error").drop_null().to_pylist())
    return counts


def _alive(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def status_report(out_dir: Path) -> str:
    """Where a run into ``out_dir`` stands, as a few lines. Reads only.

    Raises:
        ConfigError: ``out_dir`` holds no batchrun output.
    """
    manifest = load_manifest(out_dir)
    if manifest is None:
        raise ConfigError(f"{out_dir} holds no batchrun run (no manifest.json)")
    parts_through = int(manifest.get("parts_through", -1))
    errors = ErrorTally()
    by_variant = _latest_statuses(out_dir, parts_through, errors)
    # Rows of sweep cells since dropped from the job are told apart: counted
    # in, they made "-5 not reached".
    in_job = set(manifest.get("variants") or [None])
    ok = sum(c[0] for name, c in by_variant.items() if name in in_job)
    failed = sum(c[1] for name, c in by_variant.items() if name in in_job)
    cells = max(1, len(manifest.get("variants") or []))
    stats = StatsCollector()
    stats.restore(manifest.get("stats", {}))
    for number, path in segments(out_dir / JOURNAL_DIR):
        if number > parts_through:
            stats.record(list(read_segment(path)))
    rows = manifest.get("counts", {}).get("input_rows")
    total = None if rows is None else rows * cells
    state = manifest.get("status", "unknown")
    reason = manifest.get("error")
    if state == "aborted" and isinstance(reason, str) and reason:
        state = f"aborted: {reason}"
    if state == "running":
        held = OutputLock.held(out_dir)
        alive = _alive(manifest.get("pid")) if held is None else held
        state = (
            f"running (pid {manifest.get('pid')})"
            if alive
            else "stopped before finishing (run the same command to resume)"
        )
    files = [p for _, p in list_parts(out_dir / RESULTS_DIR)]
    files += [p for _, p in segments(out_dir / JOURNAL_DIR)]
    last = max((p.stat().st_mtime for p in files if p.exists()), default=None)
    last_text = (
        datetime.fromtimestamp(last, UTC).isoformat(timespec="seconds")
        if last is not None
        else "never"
    )
    t = stats.total
    todo = f", {total - ok - failed} not reached" if total is not None else ""
    names = list(manifest.get("variants") or [])
    names += sorted(n for n in by_variant if n is not None and n not in names)
    per_variant = []
    for name in names:
        done_ok, done_failed = by_variant.get(name, [0, 0])
        left = "" if rows is None else f", {rows - done_ok - done_failed} not reached"
        if name not in in_job:
            left = " (no longer in the job)"
        per_variant.append(f"  {name}: {done_ok} ok, {done_failed} failed{left}")
    return "\n".join(
        [
            f"{out_dir}: {state}",
            f"rows: {ok} ok, {failed} failed{todo}",
            *per_variant,
            *errors.lines(),
            f"requests: {t.attempts} attempts, {t.retries} retries,"
            f" {t.rate_limited} rate-limited",
            f"tokens so far: {t.prompt_tokens} prompt + {t.completion_tokens}"
            f" completion = {t.total_tokens}",
            *([no_usage_line(t.no_usage, t.succeeded)] if t.no_usage else []),
            f"last write: {last_text}",
        ]
    )
