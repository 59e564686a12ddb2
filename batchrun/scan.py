"""One cheap pass over the input before any request is sent.

It validates every row (and the template's columns), counts the rows, checks
that ids are unique across all inputs, notes whether ids are row positions,
and learns the types of kept columns. The first problem is an ``InputError``
naming the file, line or row, and field.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError
from .payload import RequestBuilder
from .sinks import infer_type
from .sources import IdSet, RowBatch, iter_batches

__all__ = ["Scan", "locate", "scan_inputs"]


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
    """

    total: int
    kept: dict[str, Any]
    positional: bool


def scan_inputs(files: Sequence[Path], builder: RequestBuilder) -> Scan:
    """Check every row of ``files``. Blocking.

    Raises:
        InputError: The first bad row, or a duplicate id naming both rows.
    """
    ids = IdSet()
    keep = builder.options.keep_columns
    kinds: dict[str, set[type]] = {name: set() for name in keep}
    present: set[str] = set()
    position = 0
    positional = False
    for batch in iter_batches(files, columns=builder.columns()):
        batch_ids = []
        for index, row in enumerate(batch.rows):
            try:
                row_id = builder.row_id(row, position)
                builder.check(row)
            except InputError as exc:
                raise locate(exc, batch, index) from None
            positional = positional or builder.is_positional(row)
            batch_ids.append(row_id)
            position += 1
            for name in keep:
                if name in row:
                    present.add(name)
                    kinds[name].add(type(row[name]))
        ids.add_many(batch_ids)
    missing = [name for name in keep if name not in present]
    if missing and position:
        raise InputError(
            "--keep-columns names a column no row has",
            path=str(files[0]),
            field=missing[0],
        )
    duplicate = ids.first_duplicate()
    if duplicate is not None:
        raise _duplicate_error(files, builder, duplicate)
    return Scan(
        total=position,
        kept={name: infer_type(kinds[name]) for name in keep},
        positional=positional,
    )


def _duplicate_error(
    files: Sequence[Path], builder: RequestBuilder, wanted: str
) -> InputError:
    """Find the first two rows that share ``wanted`` and name both."""
    first: str | None = None
    position = 0
    for batch in iter_batches(files, columns=builder.columns()):
        for index, row in enumerate(batch.rows):
            if builder.row_id(row, position) == wanted:
                number = batch.numbers[index]
                if first is not None:
                    return InputError(
                        f"duplicate id {wanted!r}, first at {first}",
                        path=batch.path,
                        line=number,
                        kind=batch.kind,
                        field=builder.options.id_column or "id",
                    )
                sep = ":" if batch.kind == "line" else " row "
                first = f"{batch.path}{sep}{number}"
            position += 1
    return InputError(f"duplicate id {wanted!r}")  # pragma: no cover - found above
