"""The validation pass (``batchrun.scan``) on its own."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from batchrun.config import RequestOptions
from batchrun.errors import InputError
from batchrun.payload import RequestBuilder
from batchrun.scan import ScanStopped, scan_inputs

from .helpers import prompts, write_jsonl, write_parquet


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


def test_a_parquet_file_without_the_prompt_column_names_its_text_columns(
    tmp_path: Path,
) -> None:
    """The reader reads only the columns a request needs, so the file itself
    is checked: it names its text columns (not the id) and --prompt-column."""
    path = write_parquet(
        tmp_path / "qa.parquet", [{"id": "a", "question": "Why?", "n": 1}]
    )
    builder = RequestBuilder(RequestOptions(model="m"))
    with pytest.raises(InputError) as info:
        scan_inputs([path], builder)
    assert str(info.value) == (
        f"{path}: has neither a 'prompt' nor a 'messages' column (it has text in"
        " 'question': name it with --prompt-column question, or build a prompt"
        " with --template)"
    )
    named = RequestBuilder(RequestOptions(model="m", prompt_column="question"))
    assert scan_inputs([path], named).total == 1
    templated = RequestBuilder(RequestOptions(model="m", template="{{ question }}"))
    assert scan_inputs([path], templated).total == 1


def test_the_first_bad_row_comes_with_how_many_more(tmp_path: Path) -> None:
    """The scan reads on past the first bad row: its error says how many more
    there are and where the next is, so one fix can cover them all."""
    rows: list[dict[str, object]] = [{"id": f"r{i}", "prompt": "p"} for i in range(9)]
    for i in (2, 5, 6):
        del rows[i]["prompt"]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    builder = RequestBuilder(RequestOptions(model="m"))
    with pytest.raises(InputError) as info:
        scan_inputs([path], builder)
    assert str(info.value) == (
        f"{path}:3: row has neither 'prompt' nor 'messages'; 2 more bad rows"
        f" after it (the next at {path}:6)"
    )


def test_bad_rows_before_a_line_that_is_not_json(tmp_path: Path) -> None:
    """Rows are read a batch at a time: a line that is not JSON ends the scan,
    and the error of the first bad row before it says where."""
    lines = [f'{{"id": "r{i}"}}' for i in range(1500)]  # no prompts
    lines[1400] = '{"id": "broken'
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    builder = RequestBuilder(RequestOptions(model="m"))
    with pytest.raises(InputError) as info:
        scan_inputs([path], builder)
    message = str(info.value)
    assert message.startswith(f"{path}:1: row has neither 'prompt' nor 'messages';")
    assert message.endswith(
        f"(the next at {path}:2), and no reading on past {path}:1401"
    )


def test_a_template_column_missing_is_named_with_the_columns_there_are(
    tmp_path: Path,
) -> None:
    """A misspelt template column: a JSONL row says which fields it has, and
    a Parquet file (whose rows hold only the columns read) its columns."""
    rows = [{"id": "a", "question": "Why?"}]
    builder = RequestBuilder(RequestOptions(model="m", template="Q: {{ questoin }}"))
    jsonl = write_jsonl(tmp_path / "in.jsonl", rows)
    with pytest.raises(InputError) as info:
        scan_inputs([jsonl], builder)
    assert str(info.value) == (
        f"{jsonl}:1: field 'questoin': column used by the template is missing"
        " (the row has 'id', 'question')"
    )
    parquet = write_parquet(tmp_path / "in.parquet", rows)
    with pytest.raises(InputError) as info:
        scan_inputs([parquet], builder)
    assert str(info.value) == (
        f"{parquet}: the template uses column 'questoin', which the file lacks"
        " (it has 'id', 'question')"
    )


def test_a_batch_api_parquet_file_needs_no_prompt_column(tmp_path: Path) -> None:
    """OpenAI Batch API rows carry their request in ``body``: the file-level
    check of the prompt's column leaves such a file to the row checks."""
    body = {"model": "m", "prompt": "Hi", "max_tokens": 4}
    rows = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body}
        for i in range(2)
    ]
    path = write_parquet(tmp_path / "batch.parquet", rows)
    assert scan_inputs([path], RequestBuilder(RequestOptions())).total == 2
