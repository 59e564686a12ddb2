"""One cheap pass over the input before any request is sent.

It validates every row (and the template's columns), counts the rows, checks
that ids are unique across all inputs, notes whether ids are row positions,
and learns the types of kept columns. The first problem is an ``InputError``
naming the file, line or row, and field.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError
from .payload import RequestBuilder, columns_of, is_batch_row, listed, text_hint
from .sinks import infer_type
from .sources import IdSet, RowBatch, iter_batches, parquet_columns

__all__ = ["Scan", "ScanStopped", "locate", "scan_inputs"]


def locate(exc: InputError, batch: RowBatch, index: int) -> InputError:
    """``exc`` again, naming the file and line (or row) of ``batch.rows[index]``."""
    return InputError(
        exc.reason,
        path=batch.path,
        line=batch.numbers[index],
        kind=batch.kind,
        field=exc.field,
    )


@dataclass(frozen=True, slots=True)
class Scan:
    """What the scan learned.

    Attributes:
        total: Rows in all inputs.
        kept: Kept columns and their Arrow types, in order.
        positional: Some row's id is its position (no id column).
        repaired: Rows whose text held lone UTF-16 surrogates, read as U+FFFD.
        first_repaired: The file and line of the first of those.
    """

    total: int
    kept: dict[str, Any]
    positional: bool
    repaired: int = 0
    first_repaired: str | None = None


class ScanStopped(Exception):
    """The scan was told to stop (the run was interrupted while it read)."""


def scan_inputs(
    files: Sequence[Path],
    builder: RequestBuilder,
    cells: Sequence[RequestBuilder] = (),
    stop: threading.Event | None = None,
    limit: int | None = None,
) -> Scan:
    """Check every row of ``files``. Blocking.

    Args:
        files: The inputs.
        builder: Gives row ids and kept columns.
        cells: One builder per sweep variant; each row must suit every one.
        stop: Set from another thread to end the scan at the next batch: a
            Ctrl-C during the scan of a large input would otherwise wait for
            all of it (8 s for 6,000,000 short rows).
        limit: Check only the first this many rows (``--limit``).

    Raises:
        InputError: The first bad row, or a duplicate id naming both rows.
        ScanStopped: ``stop`` was set.
    """
    ids = IdSet()
    keep = builder.options.keep_columns
    kinds: dict[str, set[type]] = {name: set() for name in keep}
    present: set[str] = set()
    position = 0
    positional = False
    repaired = 0
    first_repaired = None
    checkers = list(cells) or [builder]
    columns = columns_of([builder, *checkers])
    for path in files:
        _check_columns(path, checkers)
    bad = _BadRows()
    try:
        for batch in iter_batches(files, columns=columns, limit=limit):
            if stop is not None and stop.is_set():
                raise ScanStopped
            if batch.repaired:
                if first_repaired is None:
                    first_repaired = f"{batch.path}:{batch.repaired[0]}"
                repaired += len(batch.repaired)
            batch_ids = []
            for index, row in enumerate(batch.rows):
                try:
                    row_id = builder.row_id(row, position)
                    for checker in checkers:
                        checker.check(row)
                except InputError as exc:
                    # Counted on to the end: the first is the error, told with
                    # how many more rows a fix has to cover.
                    bad.add(locate(exc, batch, index))
                    continue
                positional = positional or builder.is_positional(row)
                batch_ids.append(row_id)
                position += 1
                for name in keep:
                    if name in row:
                        present.add(name)
                        kinds[name].add(type(row[name]))
            ids.add_many(batch_ids)
    except InputError as exc:  # the file itself: a line that is not JSON
        if bad.first is None:
            raise
        bad.add(exc, last=True)
    bad.raise_first()
    missing = [name for name in keep if name not in present]
    if missing and position:
        raise InputError(
            "--keep-columns names a column no row has",
            path=str(files[0]),
            field=missing[0],
        )
    suspects = ids.suspects()
    if suspects:
        error = _find_duplicate(files, builder, suspects, limit)
        if error is not None:
            raise error
    return Scan(
        total=position,
        kept={name: infer_type(kinds[name]) for name in keep},
        positional=positional,
        repaired=repaired,
        first_repaired=first_repaired,
    )


class _BadRows:
    """The bad rows the scan met: the first, how many more, where the next."""

    def __init__(self) -> None:
        self.first: InputError | None = None
        self.more = 0
        self.next_at: str | None = None
        self.stopped_at: str | None = None

    def add(self, error: InputError, *, last: bool = False) -> None:
        """One more bad row; ``last``: the scan could not read on past it."""
        if self.first is None:
            self.first = error
            return
        self.more += 1
        if self.next_at is None:
            self.next_at = error.where
        if last:
            self.stopped_at = error.where

    def raise_first(self) -> None:
        """Raise the first bad row's error, saying how many more there are.

        Raises:
            InputError: There was a bad row.
        """
        first = self.first
        if first is None:
            return
        reason = first.reason
        if self.more:
            rows = "row" if self.more == 1 else "rows"
            reason += f"; {self.more:,} more bad {rows} after it (the next at"
            reason += f" {self.next_at})"
            if self.stopped_at is not None:
                reason += f", and no reading on past {self.stopped_at}"
        raise InputError(
            reason,
            path=first.path,
            line=first.line,
            kind=first.kind,
            field=first.field,
        )


def _check_columns(path: Path, checkers: Sequence[RequestBuilder]) -> None:
    """A Parquet file without the columns a request needs is named with the
    columns it has. The reader reads only the columns a request needs, so
    the rows themselves cannot say which the file has.

    Raises:
        InputError: A template's column is missing, or (without a template)
            both the prompt's and the messages' are.
    """
    columns = parquet_columns(path)
    if columns is None or is_batch_row(columns):
        return  # a Batch API file's requests are in its body column
    for checker in checkers:
        opts = checker.options
        if opts.template is not None:
            for name in checker.template_fields:
                if name not in columns:
                    raise InputError(
                        f"the template uses column {name!r}, which the file"
                        f" lacks (it has {listed(columns) or 'no columns'})",
                        path=str(path),
                    )
            continue
        wanted = (opts.prompt_column, opts.messages_column)
        if not any(name in columns for name in wanted):
            texts = [name for name, text in columns.items() if text]
            raise InputError(
                f"has neither a {wanted[0]!r} nor a {wanted[1]!r} column"
                f"{text_hint(texts, opts)}",
                path=str(path),
            )


def _find_duplicate(
    files: Sequence[Path],
    builder: RequestBuilder,
    suspects: set[int],
    limit: int | None,
) -> InputError | None:
    """Name the first id that really occurs twice, and both of its rows.

    Only ids whose hash is a suspect are remembered, so this stays small; a
    suspect that turns out to be two different ids is a hash collision.
    """
    first_seen: dict[str, str] = {}
    position = 0
    for batch in iter_batches(files, columns=builder.columns(), limit=limit):
        for index, row in enumerate(batch.rows):
            row_id = builder.row_id(row, position)
            position += 1
            if IdSet.key(row_id) not in suspects:
                continue
            number = batch.numbers[index]
            if row_id in first_seen:
                return InputError(
                    f"duplicate id {row_id!r}, first at {first_seen[row_id]}",
                    path=batch.path,
                    line=number,
                    kind=batch.kind,
                    field=builder.options.id_column or "id",
                )
            sep = ":" if batch.kind == "line" else " row "
            first_seen[row_id] = f"{batch.path}{sep}{number}"
    return None
