"""Whole runs against the simulator over real sockets, through the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from batchrun.simulator import ScriptedResponse, SimulatorHandle, count_tokens
from batchrun.sinks import COMPACT_MIN_PARTS, RESULT_SCHEMA, USAGE_SCHEMA

from .helpers import (
    SimFactory,
    WriteInput,
    prompts,
    read_results,
    run_against,
    run_cli,
    write_jsonl,
)


def test_completions_every_row_ok(
    sim: SimulatorHandle, write_input: WriteInput, tmp_path: Path
) -> None:
    """Every input row gets exactly one ok result carrying its id and completion."""
    inp = write_input(prompts(120))
    assert run_against(sim, inp, tmp_path / "out") == 0
    rows = read_results(tmp_path / "out")
    assert [r["id"] for r in rows] == sorted(f"row-{i}" for i in range(120))
    assert {r["status"] for r in rows} == {"ok"}
    for row in rows:
        assert row["endpoint"] == "completions"
        assert row["model"] == "m"
        assert row["completion"] == row["choices"][0]["text"]
        assert row["completion_tokens"] == count_tokens(row["completion"])
        assert row["prompt"].startswith("Prompt number ")
        assert json.loads(row["response"])["choices"][0]["text"] == row["completion"]
        assert row["http_status"] == 200
        assert row["attempts"] == 1
        assert row["error"] is None
        assert row["finished_at"] >= row["started_at"]
    assert sim.state.snapshot()["requests"] == 120


def test_outputs_line_up_with_inputs(sim: SimulatorHandle, tmp_path: Path) -> None:
    """Each result's prompt is the prompt of the input row with the same id."""
    rows = [{"id": f"x{i}", "prompt": f"unique prompt {i * 7}"} for i in range(300)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    assert run_against(sim, inp, tmp_path / "out", "--concurrency", "50") == 0
    by_id = {r["id"]: r["prompt"] for r in rows}
    for result in read_results(tmp_path / "out"):
        assert result["prompt"] == by_id[result["id"]]


def test_output_schema(sim: SimulatorHandle, tmp_path: Path) -> None:
    """results/ and usage.parquet have the documented columns and types."""
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(5))
    assert run_against(sim, inp, tmp_path / "out") == 0
    schema = ds.dataset(tmp_path / "out" / "results").schema
    assert schema.equals(RESULT_SCHEMA)
    assert pq.read_schema(tmp_path / "out" / "usage.parquet").equals(USAGE_SCHEMA)


def test_chat_rows_and_system_message(sim: SimulatorHandle, tmp_path: Path) -> None:
    """messages rows go to chat; --system is put first; prompt holds the messages."""
    rows = [
        {"id": "a", "messages": [{"role": "user", "content": "Hello there"}]},
        {"id": "b", "messages": [{"role": "user", "content": "How are you?"}]},
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    assert run_against(sim, inp, tmp_path / "out", "--system", "Be brief.") == 0
    results = read_results(tmp_path / "out")
    assert [r["endpoint"] for r in results] == ["chat", "chat"]
    sent = json.loads(results[0]["prompt"])
    assert sent == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
    ]
    assert json.loads(results[0]["response"])["object"] == "chat.completion"
    assert results[0]["completion"]


def test_mixed_endpoints_and_batch_format(sim: SimulatorHandle, tmp_path: Path) -> None:
    """Batch-format lines go to their url with their body; body fields beat flags."""
    rows = [
        {
            "custom_id": "req-1",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": "other-model",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 3,
            },
        },
        {
            "custom_id": "req-2",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"prompt": "Once upon a time"},
        },
    ]
    inp = write_jsonl(tmp_path / "batch.jsonl", rows)
    assert run_against(sim, inp, tmp_path / "out", "--max-tokens", "5") == 0
    by_id = {r["id"]: r for r in read_results(tmp_path / "out")}
    assert by_id["req-1"]["endpoint"] == "chat"
    assert by_id["req-1"]["model"] == "other-model"
    assert by_id["req-1"]["completion_tokens"] == 3
    assert by_id["req-2"]["endpoint"] == "completions"
    assert by_id["req-2"]["model"] == "m"
    assert by_id["req-2"]["completion_tokens"] == 5


def test_template_renders_row_columns(
    sim_factory: SimFactory, write_input: WriteInput, tmp_path: Path
) -> None:
    """--template renders each row's columns into the prompt that is sent."""
    sim = sim_factory(record_requests=True)
    inp = write_input(
        [{"id": "1", "name": "Ada", "n": 3}, {"id": "2", "name": "Bo", "n": 4}]
    )
    code = run_against(
        sim, inp, tmp_path / "out", "--template", "Hi {{ name }} x{{ n * 2 }}"
    )
    assert code == 0
    assert sorted(r["prompt"] for r in sim.state.requests) == ["Hi Ada x6", "Hi Bo x8"]
    assert [r["prompt"] for r in read_results(tmp_path / "out")] == [
        "Hi Ada x6",
        "Hi Bo x8",
    ]


def test_template_into_chat_user_message(
    sim_factory: SimFactory, tmp_path: Path
) -> None:
    """With --endpoint chat the rendered template is the user message."""
    sim = sim_factory(record_requests=True)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"topic": "owls"}])
    code = run_against(
        sim,
        inp,
        tmp_path / "out",
        "--endpoint",
        "chat",
        "--template",
        "About {{topic}}",
        "--system",
        "S",
    )
    assert code == 0
    assert sim.state.requests[0]["messages"] == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "About owls"},
    ]


def test_sampling_flags_and_params_reach_the_body(
    sim_factory: SimFactory, tmp_path: Path
) -> None:
    """Sampling flags and --param go into the body only when given."""
    sim = sim_factory(record_requests=True)
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(1))
    code = run_against(
        sim,
        inp,
        tmp_path / "out",
        "--max-tokens",
        "7",
        "--temperature",
        "0.5",
        "--stop",
        "\n",
        "--stop",
        "END",
        "--param",
        "raw_output=true",
        "--param",
        "user=alice",
    )
    assert code == 0
    body = sim.state.requests[0]
    assert body == {
        "model": "m",
        "prompt": "Prompt number 0:",
        "max_tokens": 7,
        "temperature": 0.5,
        "stop": ["\n", "END"],
        "raw_output": True,
        "user": "alice",
    }


def test_n_choices(sim: SimulatorHandle, tmp_path: Path) -> None:
    """With --n 3 the choices column holds three choices."""
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(2))
    assert run_against(sim, inp, tmp_path / "out", "--n", "3") == 0
    for row in read_results(tmp_path / "out"):
        assert [c["index"] for c in row["choices"]] == [0, 1, 2]
        assert all(c["finish_reason"] in ("stop", "length") for c in row["choices"])


def test_ids_default_to_position(
    sim: SimulatorHandle, write_input: WriteInput, tmp_path: Path
) -> None:
    """Rows without an id column get their 0-based position as a string id."""
    inp = write_input([{"prompt": f"p{i}"} for i in range(4)])
    assert run_against(sim, inp, tmp_path / "out") == 0
    rows = read_results(tmp_path / "out")
    assert {r["id"]: r["prompt"] for r in rows} == {str(i): f"p{i}" for i in range(4)}


def test_id_column_and_numeric_ids(sim: SimulatorHandle, tmp_path: Path) -> None:
    """--id-column picks the id field; numeric ids become strings."""
    inp = write_jsonl(
        tmp_path / "in.jsonl", [{"key": 10, "prompt": "a"}, {"key": 11, "prompt": "b"}]
    )
    assert run_against(sim, inp, tmp_path / "out", "--id-column", "key") == 0
    assert [r["id"] for r in read_results(tmp_path / "out")] == ["10", "11"]


def test_keep_columns(
    sim: SimulatorHandle, write_input: WriteInput, tmp_path: Path
) -> None:
    """--keep-columns carries input columns; a clash is renamed input_<name>."""
    rows = [
        {"id": "a", "prompt": "x", "stars": 5, "model": "gpt"},
        {"id": "b", "prompt": "y", "stars": None, "model": "gpt"},
    ]
    inp = write_input(rows)
    assert run_against(sim, inp, tmp_path / "out", "--keep-columns", "stars,model") == 0
    results = read_results(tmp_path / "out")
    assert [r["stars"] for r in results] == [5, None]
    assert [r["input_model"] for r in results] == ["gpt", "gpt"]
    assert [r["model"] for r in results] == ["m", "m"]


def test_no_raw_drops_response(sim: SimulatorHandle, tmp_path: Path) -> None:
    """--no-raw leaves the response column empty."""
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    assert run_against(sim, inp, tmp_path / "out", "--no-raw") == 0
    assert {r["response"] for r in read_results(tmp_path / "out")} == {None}


def test_usage_matches_simulator(sim: SimulatorHandle, tmp_path: Path) -> None:
    """usage.parquet sums equal what the simulator itself counted and billed."""
    rows = prompts(40) + [
        {"id": f"c{i}", "messages": [{"role": "user", "content": f"q {i}"}]}
        for i in range(25)
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    assert run_against(sim, inp, tmp_path / "out") == 0
    usage = {
        (r["model"], r["endpoint"]): r
        for r in pq.read_table(tmp_path / "out" / "usage.parquet").to_pylist()
    }
    total = usage[("*", "*")]
    seen = sim.state.snapshot()
    assert total["requests"] == seen["requests"] == 65
    assert total["prompt_tokens"] == seen["prompt_tokens"]
    assert total["completion_tokens"] == seen["completion_tokens"]
    assert total["total_tokens"] == seen["total_tokens"]
    assert usage[("m", "completions")]["requests"] == 40
    assert usage[("m", "chat")]["requests"] == 25
    assert total["succeeded"] == 65
    assert total["failed"] == 0
    assert (
        0 < total["latency_p50_s"] <= total["latency_p90_s"] <= total["latency_p99_s"]
    )
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    assert manifest["counts"]["succeeded"] == 65


@pytest.mark.parametrize("concurrency", [16, 150])
def test_concurrency_is_reached(
    sim_factory: SimFactory, tmp_path: Path, concurrency: int
) -> None:
    """The simulator sees exactly --concurrency requests in flight, even above 100.

    Answers take 800 ms: on a loaded machine, opening 150 connections took
    longer than the 150 ms they once took, and the first answers freed their
    slots before the last request went out (138 in flight).
    """
    sim = sim_factory(latency_ms=800)
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(concurrency * 2))
    assert (
        run_against(sim, inp, tmp_path / "out", "--concurrency", str(concurrency)) == 0
    )
    assert sim.state.snapshot()["max_in_flight"] == concurrency


def test_empty_input_writes_empty_table(
    sim: SimulatorHandle, write_input: WriteInput, tmp_path: Path
) -> None:
    """Empty input exits 0 with an empty results table of the full schema."""
    inp = write_input([])
    assert run_against(sim, inp, tmp_path / "out") == 0
    table = ds.dataset(tmp_path / "out" / "results").to_table()
    assert table.num_rows == 0
    assert table.schema.equals(RESULT_SCHEMA)
    assert sim.state.snapshot()["requests"] == 0


def test_400_is_an_error_row(sim: SimulatorHandle, tmp_path: Path) -> None:
    """A 400 becomes an error row; the other rows are unaffected; exit code 1."""
    rows = [*prompts(5), {"id": "bad", "prompt": "break me [[sim:status=400]]"}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    assert run_against(sim, inp, tmp_path / "out") == 1
    by_id = {r["id"]: r for r in read_results(tmp_path / "out")}
    assert by_id["bad"]["status"] == "error"
    assert by_id["bad"]["http_status"] == 400
    assert by_id["bad"]["error"].startswith("PermanentError: HTTP 400")
    assert by_id["bad"]["completion"] is None
    assert all(by_id[f"row-{i}"]["status"] == "ok" for i in range(5))


def test_401_aborts_and_key_never_written(
    sim_factory: SimFactory,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A wrong key aborts with exit 3 and a clear message; the key is never written."""
    sim = sim_factory(api_key="right-key")
    secret = "sk-wrong-secret-12345"
    monkeypatch.setenv("MY_KEY", secret)
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(500))
    code = run_against(
        sim, inp, tmp_path / "out", "--api-key-env", "MY_KEY", "--concurrency", "4"
    )
    assert code == 3
    err = capsys.readouterr().err
    assert "API key is missing or wrong" in err
    assert secret not in err
    assert sim.state.snapshot()["requests"] < 20
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["status"] == "aborted"
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    # status says why it stopped.
    assert run_cli("status", tmp_path / "out") == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"{tmp_path / 'out'}: aborted: HTTP 401 from ")
    assert "API key is missing or wrong" in first


def test_right_key_is_sent(
    sim_factory: SimFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key from --api-key-env is sent as a bearer token and never written to OUT."""
    sim = sim_factory(api_key="right-key-abcdef")
    monkeypatch.setenv("MY_KEY", "right-key-abcdef")
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(3))
    assert run_against(sim, inp, tmp_path / "out", "--api-key-env", "MY_KEY") == 0
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert b"right-key-abcdef" not in path.read_bytes()


def test_each_result_names_its_input_row(
    sim_factory: SimFactory, tmp_path: Path
) -> None:
    """``row`` is the input position, counted on through a second input file:
    sorted by it, results line up with the input whatever order they were
    answered in. Rows without ids (ids are positions too) included."""
    sim = sim_factory(latency_ms=1, seed=3)
    first = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"a{i}"} for i in range(12)])
    second = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"b{i}"} for i in range(5)])
    rows = [*(f"a{i}" for i in range(12)), *(f"b{i}" for i in range(5))]
    out = tmp_path / "out"
    code = run_cli(
        "run", first, second, "-o", out, "--base-url", sim.base_url, "--model", "m",
        "--concurrency", "8", "--quiet",
    )  # fmt: skip
    assert code == 0
    results = sorted(read_results(out), key=lambda r: int(r["row"]))
    assert [r["row"] for r in results] == list(range(17))
    assert [r["prompt"] for r in results] == rows
    assert [r["id"] for r in results] == [str(i) for i in range(17)]


def test_parts_end_at_a_size(sim: SimulatorHandle, tmp_path: Path) -> None:
    """Results of long prompts go into parts of about 16 MiB, not 1,000 rows:
    with prompts of 200 KB, parts of 1,000 rows took the peak RSS to 1.7 GB."""
    from batchrun import EndpointConfig, OutputOptions, RequestOptions, RunConfig, run

    long = "x" * (2 << 20)
    rows = [{"id": f"r{i:02d}", "prompt": f"{i}{long}"} for i in range(12)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    stats = run(
        RunConfig(
            inputs=(inp,),
            output=OutputOptions(out_dir=out, raw_response=False),
            endpoint=EndpointConfig(base_url=sim.base_url),
            request=RequestOptions(model="m", params={"max_tokens": 2}),
            concurrency=2,
            progress="off",
        )
    )
    assert stats.succeeded == 12
    parts = list((out / "results").iterdir())
    assert 2 <= len(parts) <= 4  # 24 MiB of prompts
    results = read_results(out)
    assert [r["prompt"] for r in results] == [r["prompt"] for r in rows]


def test_compaction_is_announced(
    sim_factory: SimFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Compacting many parts after the last row (about 5 s a million rows) says
    so, instead of leaving a finished bar with nothing happening."""
    from batchrun import EndpointConfig, OutputOptions, RequestOptions, RunConfig, run

    # One request at a time, each longer than the writer gathers results for:
    # about a part per row.
    sim = sim_factory(latency_ms=5)
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(100))
    out = tmp_path / "out"
    stats = run(
        RunConfig(
            inputs=(inp,),
            output=OutputOptions(out_dir=out, flush_rows=1),
            endpoint=EndpointConfig(base_url=sim.base_url),
            request=RequestOptions(model="m"),
            concurrency=1,
            progress="lines",
        )
    )
    assert stats.rows == 100
    err = capsys.readouterr().err
    found = re.search(r"batchrun: all rows done; compacting (\d+) part files", err)
    assert found is not None, err
    assert int(found.group(1)) > COMPACT_MIN_PARTS
    assert len(list((out / "results").iterdir())) == 1


def test_provider_mock_runs_without_endpoint(tmp_path: Path) -> None:
    """--provider mock serves the run from an in-process simulator."""
    inp = write_jsonl(tmp_path / "in.jsonl", prompts(10))
    code = run_cli("run", inp, "-o", tmp_path / "out", "--provider", "mock", "--quiet")
    assert code == 0
    rows = read_results(tmp_path / "out")
    assert len(rows) == 10
    assert {r["model"] for r in rows} == {"mock-model"}


def test_parts_flush_every_n_rows(sim: SimulatorHandle, tmp_path: Path) -> None:
    """Results are written in several part files as the run goes, not at the end."""
    from batchrun import EndpointConfig, OutputOptions, RequestOptions, RunConfig, run

    inp = write_jsonl(tmp_path / "in.jsonl", prompts(250))
    stats = run(
        RunConfig(
            inputs=(inp,),
            output=OutputOptions(out_dir=tmp_path / "out", flush_rows=100),
            endpoint=EndpointConfig(base_url=sim.base_url),
            request=RequestOptions(model="m"),
            concurrency=4,
            progress="off",
        )
    )
    assert stats.rows == stats.succeeded == 250
    # Three parts were written while the run went (100 + 100 + 50 rows); so
    # few need no compaction at the end.
    parts = sorted(p.name for p in (tmp_path / "out" / "results").iterdir())
    assert parts == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    assert len(read_results(tmp_path / "out")) == 250


async def test_run_inside_an_event_loop_points_to_arun(tmp_path: Path) -> None:
    """The blocking run() called where an event loop runs (a notebook's cell)
    says to await arun() instead of anyio's "Already running asyncio in this
    thread", and touches nothing."""
    from batchrun import (
        ConfigError,
        EndpointConfig,
        OutputOptions,
        RequestOptions,
        RunConfig,
        run,
    )

    config = RunConfig(
        inputs=(write_jsonl(tmp_path / "in.jsonl", prompts(3)),),
        output=OutputOptions(out_dir=tmp_path / "out"),
        endpoint=EndpointConfig(mock=True),
        request=RequestOptions(model="m"),
        progress="off",
    )
    with pytest.raises(ConfigError, match=r"use 'await batchrun.arun\(config\)'"):
        run(config)
    assert not (tmp_path / "out").exists()


def test_a_reasoning_models_thinking_has_a_column(
    sim: SimulatorHandle, tmp_path: Path
) -> None:
    """A reasoning model's thinking, which servers return apart from the
    answer, is a column of its own: kept only in the raw response, --no-raw
    lost it. DeepSeek's API and vLLM call it reasoning_content, OpenRouter
    reasoning."""

    def answer(field: str | None) -> ScriptedResponse:
        message = {"role": "assistant", "content": "42"}
        if field is not None:
            message[field] = f"thinking, as {field}"
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        return ScriptedResponse(body={"id": "c", "choices": [choice]})

    rows = [
        {"id": f"r{i}", "messages": [{"role": "user", "content": "Why?"}]}
        for i in range(3)
    ]
    for field in ("reasoning_content", "reasoning", None):
        sim.state.enqueue(answer(field))
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    assert run_against(sim, inp, out, "--no-raw", "--concurrency", "1") == 0
    results = read_results(out)
    assert [r["reasoning"] for r in results] == [
        "thinking, as reasoning_content",
        "thinking, as reasoning",
        None,
    ]
    assert {r["completion"] for r in results} == {"42"}


def test_logprobs_work_on_both_endpoints_and_have_a_column(
    sim_factory: SimFactory, tmp_path: Path
) -> None:
    """--logprobs 2 answers chat rows too (every one failed: chat takes
    logprobs as a switch), and each answer's logprobs are a column: kept only
    in the raw response, --no-raw lost them."""
    sim = sim_factory(record_requests=True)
    rows: list[dict[str, Any]] = [
        {"id": "c", "prompt": "Say hi"},
        {"id": "m", "messages": [{"role": "user", "content": "Say hi"}]},
    ]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    assert run_against(sim, inp, out, "--logprobs", "2", "--no-raw") == 0
    by_id = {r["id"]: r for r in read_results(out)}
    completion = json.loads(by_id["c"]["logprobs"])
    assert "".join(completion["tokens"]) == by_id["c"]["completion"]
    chat = json.loads(by_id["m"]["logprobs"])
    assert "".join(t["token"] for t in chat["content"]) == by_id["m"]["completion"]
    assert by_id["m"]["response"] is None
    sent = {r.get("prompt") is None: r for r in sim.state.requests}
    assert (sent[True]["logprobs"], sent[True]["top_logprobs"]) == (True, 2)
    assert sent[False]["logprobs"] == 2
    assert run_against(sim, inp, tmp_path / "plain", "--max-tokens", "2") == 0
    assert [r["logprobs"] for r in read_results(tmp_path / "plain")] == [None, None]


def test_a_tool_call_answer_has_a_column(sim: SimulatorHandle, tmp_path: Path) -> None:
    """An answer that calls a tool has no content: its calls are a column,
    where --no-raw lost them (and with them the whole answer)."""
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "lookup", "arguments": '{"city": "Oslo"}'},
    }
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    choice = {"index": 0, "message": message, "finish_reason": "tool_calls"}
    sim.state.enqueue(ScriptedResponse(body={"id": "c", "choices": [choice]}))
    rows = [{"id": "r", "messages": [{"role": "user", "content": "Weather?"}]}]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    assert run_against(sim, inp, out, "--no-raw") == 0
    (result,) = read_results(out)
    assert (result["status"], result["completion"]) == ("ok", None)
    assert result["finish_reason"] == "tool_calls"
    assert json.loads(result["tool_calls"]) == [call]
