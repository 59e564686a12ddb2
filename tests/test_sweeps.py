"""Job files, sweeps, cost and estimates."""

from __future__ import annotations

import textwrap
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from batchrun.jobfile import to_tokens
from batchrun.simulator import SimulatorHandle

from .helpers import SimFactory, read_results, run_cli, write_jsonl, write_parquet

SWEEP = """
max_tokens = 5
keep_columns = ["topic"]

[sweep]
model = ["m1", "m2", "m3"]
temperature = [0.0, 0.7]

[sweep.template]
plain = "Tell me about {{ topic }}."
fewshot = "Q: about cats\\nA: they purr\\nQ: about {{ topic }}\\nA:"

[pricing.m1]
input = 1.0
output = 2.0

[pricing."*"]
input = 0.5
output = 0.5
"""


def _rows(n: int) -> list[dict[str, str]]:
    return [{"id": f"t{i:03d}", "topic": f"topic number {i}"} for i in range(n)]


def _job(tmp_path: Path, text: str, name: str = "job.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def _sweep(sim: SimulatorHandle, job: Path, inp: Path, out: Path, *extra: str) -> int:
    return run_cli(
        "run", inp, "-o", out, "--config", job, "--base-url", sim.base_url,
        "--quiet", *extra,
    )  # fmt: skip


def test_sweep_grid_gives_a_row_per_cell(sim: SimulatorHandle, tmp_path: Path) -> None:
    """3 models x 2 temperatures x 2 templates over 200 rows: 2,400 unique cells."""
    inp = write_jsonl(tmp_path / "in.jsonl", _rows(200))
    job = _job(tmp_path, SWEEP)
    out = tmp_path / "out"
    assert _sweep(sim, job, inp, out) == 0
    results = read_results(out)
    assert len(results) == 2400
    assert len({(r["id"], r["variant"]) for r in results}) == 2400
    assert len({r["variant"] for r in results}) == 12
    row = next(
        r for r in results if r["variant"].startswith("model=m2,temperature=0.7")
    )
    assert row["variant"] in (
        "model=m2,temperature=0.7,template=plain",
        "model=m2,temperature=0.7,template=fewshot",
    )
    assert row["model"] == "m2"
    assert row["temperature"] == 0.7
    assert row["template"] in ("plain", "fewshot")
    assert row["topic"].startswith("topic number")
    assert sim.state.snapshot()["requests"] == 2400
    # Every cell of a row names the same input row.
    assert all(r["row"] == int(r["id"][1:]) for r in results)


def test_usage_per_variant_adds_up(sim: SimulatorHandle, tmp_path: Path) -> None:
    """usage.parquet has a row per variant that sums to the '*' row, with costs."""
    inp = write_jsonl(tmp_path / "in.jsonl", _rows(20))
    out = tmp_path / "out"
    assert _sweep(sim, _job(tmp_path, SWEEP), inp, out) == 0
    usage = pq.read_table(out / "usage.parquet").to_pylist()
    total = next(r for r in usage if r["model"] == "*")
    cells = [r for r in usage if r["model"] != "*"]
    assert len(cells) == 12
    for column in ("requests", "prompt_tokens", "completion_tokens", "attempts"):
        assert sum(r[column] for r in cells) == total[column]
    seen = sim.state.snapshot()
    assert total["prompt_tokens"] == seen["prompt_tokens"]
    for r in cells:
        price = (1.0, 2.0) if r["model"] == "m1" else (0.5, 0.5)
        expected = (
            r["prompt_tokens"] * price[0] + r["completion_tokens"] * price[1]
        ) / 1e6
        assert r["cost_usd"] == pytest.approx(expected)
    assert total["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in cells))


def test_the_summary_gives_the_cost(
    sim: SimulatorHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With pricing, the run's summary gives the cost (it was only in
    usage.parquet); a resumed job's is the whole job's so far."""
    inp = write_jsonl(tmp_path / "in.jsonl", _rows(20))
    out = tmp_path / "out"
    job = _job(tmp_path, SWEEP)
    common: list[str | Path] = ["run", inp, "-o", out, "--config", job]
    said = []
    for limit in ("5", "20"):
        code = run_cli(
            *common, "--base-url", sim.base_url, "--progress", "off", "--limit", limit
        )
        assert code == 0
        usage = pq.read_table(out / "usage.parquet").to_pylist()
        cost = next(r for r in usage if r["model"] == "*")["cost_usd"]
        text = capsys.readouterr()
        lines = (text.out + text.err).splitlines()
        said.append(([x for x in lines if x.startswith("cost")], cost))
    (first, cost_5), (second, cost_20) = said
    assert 0 < cost_5 < cost_20
    assert first == [f"cost: ${cost_5:.4f}"]
    assert second == [f"cost of the job so far, earlier runs included: ${cost_20:.4f}"]


def test_adding_a_model_runs_only_new_cells(
    sim: SimulatorHandle, tmp_path: Path
) -> None:
    """A fourth model in the sweep file sends exactly rows x 2 x 2 new requests."""
    inp = write_jsonl(tmp_path / "in.jsonl", _rows(200))
    out = tmp_path / "out"
    job = _job(tmp_path, SWEEP)
    assert _sweep(sim, job, inp, out) == 0
    before = sim.state.snapshot()["requests"]
    _job(tmp_path, SWEEP.replace('"m3"]', '"m3", "m4"]'))
    assert _sweep(sim, job, inp, out) == 0
    assert sim.state.snapshot()["requests"] - before == 800
    results = read_results(out)
    assert len(results) == 3200
    assert Counter(r["model"] for r in results)["m4"] == 800


def test_sweep_work_is_interleaved(sim_factory: SimFactory, tmp_path: Path) -> None:
    """Requests go row by row across variants, so a partial sweep is balanced."""
    sim = sim_factory(record_requests=True)
    inp = write_jsonl(tmp_path / "in.jsonl", _rows(30))
    job = _job(tmp_path, SWEEP)
    assert _sweep(sim, job, inp, tmp_path / "out", "--concurrency", "1") == 0
    first = sim.state.requests[:24]
    assert Counter(body["model"] for body in first) == {"m1": 8, "m2": 8, "m3": 8}


def test_templated_sweep_over_parquet(sim: SimulatorHandle, tmp_path: Path) -> None:
    """Parquet is read column by column, and every cell's template columns are
    read: reading only the base request's, every row of a templated sweep over
    a Parquet input failed, "'topic' is undefined", with no request sent."""
    inp = write_parquet(tmp_path / "in.parquet", _rows(10))
    out = tmp_path / "out"
    sweep = SWEEP.replace('keep_columns = ["topic"]\n', "")  # reads topic anyway
    assert sweep != SWEEP
    assert _sweep(sim, _job(tmp_path, sweep), inp, out) == 0
    results = read_results(out)
    assert len(results) == 120
    assert {r["status"] for r in results} == {"ok"}
    assert sim.state.snapshot()["requests"] == 120


def test_status_shows_each_variant(
    sim: SimulatorHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """batchrun status lists progress per variant."""
    inp = write_jsonl(tmp_path / "in.jsonl", _rows(5))
    out = tmp_path / "out"
    assert _sweep(sim, _job(tmp_path, SWEEP), inp, out) == 0
    capsys.readouterr()
    assert run_cli("status", out) == 0
    text = capsys.readouterr().out
    assert (
        "model=m1,temperature=0.0,template=plain: 5 ok, 0 failed, 0 not reached" in text
    )
    assert text.count(" ok, ") == 13


def test_status_after_a_cell_is_dropped(
    sim: SimulatorHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model swapped for another in the sweep: status counts the job as it
    is now, and shows the dropped cell's rows apart. Counted in, they made
    "15 ok, 0 failed, -5 not reached"."""
    inp = write_jsonl(tmp_path / "in.jsonl", _rows(5))
    out = tmp_path / "out"
    sweep = 'template = "{{{{ topic }}}}"\nmax_tokens = 4\n[sweep]\nmodel = [{}]\n'
    first = _job(tmp_path, sweep.format('"m1", "m2"'), "a.toml")
    assert _sweep(sim, first, inp, out) == 0
    second = _job(tmp_path, sweep.format('"m1", "m3"'), "b.toml")
    assert _sweep(sim, second, inp, out) == 0
    capsys.readouterr()
    assert run_cli("status", out) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:5] == [
        "rows: 10 ok, 0 failed, 0 not reached",
        "  model=m1: 5 ok, 0 failed, 0 not reached",
        "  model=m3: 5 ok, 0 failed, 0 not reached",
        "  model=m2: 5 ok, 0 failed (no longer in the job)",
    ]


def test_explicit_variants(sim: SimulatorHandle, tmp_path: Path) -> None:
    """[[variant]] tables stand beside or instead of the grid."""
    job = _job(
        tmp_path,
        """
        max_tokens = 3
        template = "About {{ topic }}"

        [[variant]]
        name = "small-cold"
        model = "s"
        temperature = 0.0

        [[variant]]
        model = "big"
        params = { top_p = 0.5 }
        """,
    )
    inp = write_jsonl(tmp_path / "in.jsonl", _rows(4))
    assert _sweep(sim, job, inp, tmp_path / "out") == 0
    variants = Counter(r["variant"] for r in read_results(tmp_path / "out"))
    assert variants == {"small-cold": 4, "model=big,top_p=0.5": 4}


def test_job_file_options_and_command_line_override(
    sim_factory: SimFactory, tmp_path: Path
) -> None:
    """Options come from the job file; a flag on the command line wins."""
    sim = sim_factory(record_requests=True)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt": "hi"}])
    job = _job(
        tmp_path,
        f"""
        inputs = ["{inp.name}"]
        model = "from-file"
        max_tokens = 7
        temperature = 0.1
        stop = ["x", "y"]
        param = {{ user = "u1" }}
        """,
    )
    code = run_cli(
        "run", "-o", tmp_path / "out", "--config", job, "--base-url", sim.base_url,
        "--quiet", "--temperature", "0.9", "--stop", "z",
    )  # fmt: skip
    assert code == 0
    body = sim.state.requests[0]
    assert body["model"] == "from-file"
    assert body["max_tokens"] == 7
    assert body["temperature"] == 0.9
    assert body["stop"] == ["z"]
    assert body["user"] == "u1"


def test_job_file_switch_and_command_line_override(
    sim_factory: SimFactory, tmp_path: Path
) -> None:
    """``probe = true`` is --probe; --no-probe on the command line wins.

    With --probe the first of four requests is answered before the other three
    go out; without it, a server on this machine gets all four at once.
    """
    sim = sim_factory(latency_ms=150)
    rows = [{"id": f"r{i}", "prompt": f"Prompt {i}:"} for i in range(4)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    job = _job(tmp_path, "model = 'm'\nconcurrency = 4\nprobe = true\n")
    assert _sweep(sim, job, inp, tmp_path / "out") == 0
    assert sim.state.snapshot()["max_in_flight"] == 3
    sim.state.reset()
    assert _sweep(sim, job, inp, tmp_path / "out2", "--no-probe") == 0
    assert sim.state.snapshot()["max_in_flight"] == 4


def test_false_in_a_job_file_is_the_negative_flag() -> None:
    """``probe = false`` becomes --no-probe, not "not given" (whose default
    probes a remote server); ``overwrite = false`` is simply left out."""
    flags = {"probe": "--probe", "overwrite": "--overwrite"}
    tokens = to_tokens(
        {"probe": False, "overwrite": False}, flags, (), {"probe": "--no-probe"}
    )
    assert tokens == ["--no-probe"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "max_token = 5\n",
            "job.toml:1: unknown key 'max_token'; did you mean 'max_tokens'?",
        ),
        (
            "model = 'm'\n\n[sweeep]\nx = [1]\n",
            "job.toml:3: unknown key 'sweeep'; did you mean 'sweep'?",
        ),
        (
            "model = 'm'\nconcurrency = 'lots'\n",
            "job.toml:2: concurrency: invalid int value: 'lots'",
        ),
        (
            "model = 'm'\nprogress = 'fancy'\n",
            "job.toml:2: progress: invalid choice: 'fancy'",
        ),
        (
            "[sweep]\ntemperature = 0.5\n",
            "job.toml:2: sweep.temperature must be a non-empty list",
        ),
        ("model = [", "job.toml: "),
        (
            "model = 'm'\noverwrite = 'yes'\n",
            "job.toml:2: overwrite must be true or false, got 'yes'",
        ),
        # Options of batchrun's own are not body fields: swept, they were sent
        # to the server as fields, and "endpoint" broke every export.
        (
            "model = 'm'\n[sweep]\nsystem = ['Be brief.', 'Be kind.']\n",
            "job.toml:3: 'system' is an option of batchrun's, and a sweep or"
            " variant varies body fields (besides model and template): it would"
            " be sent to the server as a field named 'system'",
        ),
        (
            "model = 'm'\n[[variant]]\nname = 'a'\nendpoint = 'chat'\n",
            "job.toml:4: 'endpoint' is an option of batchrun's",
        ),
    ],
)
def test_bad_job_files(
    sim: SimulatorHandle,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    text: str,
    message: str,
) -> None:
    """A bad job file is a one-line error naming the key and line, exit 2."""
    job = _job(tmp_path, text)
    inp = write_jsonl(tmp_path / "in.jsonl", _rows(1))
    assert _sweep(sim, job, inp, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert message in err[0]


def test_estimate_matches_the_run(
    sim: SimulatorHandle, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """estimate sends nothing and its prompt tokens are within 15% of the run's."""
    samples = Path(__file__).resolve().parent.parent / "samples"
    cases: list[list[str | Path]] = [
        [samples / "prompts.jsonl"],
        [samples / "chat.jsonl", "--system", "Be brief."],
        [samples / "batch.jsonl"],
        [samples / "reviews.jsonl", "--template-file", samples / "classify.j2"],
    ]
    sent = 0
    for number, (inp, *flags) in enumerate(cases):
        common = [inp, "--model", "m", "--max-tokens", "8", *flags]
        capsys.readouterr()
        assert (
            run_cli("estimate", *common, "--price-input", "1", "--price-output", "2")
            == 0
        )
        report = capsys.readouterr().out
        estimated = int(report.split("prompt tokens (estimated): ")[1].split()[0])
        assert sim.state.snapshot()["requests"] == sent  # estimate sent nothing
        out = tmp_path / f"out{number}"
        assert (
            run_cli("run", *common, "-o", out, "--base-url", sim.base_url, "--quiet")
            == 0
        )
        used = pq.read_table(out / "usage.parquet").to_pylist()[-1]["prompt_tokens"]
        sent = sim.state.snapshot()["requests"]
        assert abs(estimated - used) <= 0.15 * used, (inp, estimated, used)
        assert "cost: $" in report


@pytest.mark.parametrize("template", [None, "Say {{ topic }}"])
def test_estimate_on_the_simulator_needs_no_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], template: str | None
) -> None:
    """With --provider mock, estimate uses the simulator's model as run does,
    instead of stopping at 'no model'."""
    rows = [{**row, "prompt": row["topic"]} for row in _rows(3)]
    inp = write_jsonl(tmp_path / "in.jsonl", rows)
    extra = [] if template is None else ["--template", template]
    assert run_cli("estimate", inp, "--provider", "mock", *extra) == 0
    assert "requests: 3 rows x 1 variant(s) = 3" in capsys.readouterr().out


def test_estimate_reports_cost_and_duration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """estimate gives rows x variants, the cost range and the shortest duration."""
    inp = write_jsonl(
        tmp_path / "in.jsonl",
        [{"prompt": "one two three"}] * 0
        + [{"id": str(i), "prompt": "one two three"} for i in range(600)],
    )
    code = run_cli(
        "estimate", inp, "--model", "m", "--max-tokens", "10", "--rpm", "60",
        "--price-input", "1", "--price-output", "2",
    )  # fmt: skip
    assert code == 0
    report = capsys.readouterr().out
    assert "requests: 600 rows x 1 variant(s) = 600" in report
    assert "prompt tokens (estimated): 1800" in report
    assert "completion tokens at most: 6000" in report
    assert "cost: $0.0018 to $0.0138" in report
    assert "shortest duration under the limits: 10m00s" in report


def test_estimate_needs_no_key(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """estimate sends nothing, so a provider's key need not exist yet (it
    stopped at 'FIREWORKS_API_KEY is not set'); run still asks for it."""
    monkeypatch.delenv("FIREWORKS_API_KEY", raising=False)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"prompt": "one two three"}] * 4)
    common = ["--provider", "fireworks", "--model", "m", "--max-tokens", "10"]
    assert run_cli("estimate", inp, *common) == 0
    assert "requests: 4 rows x 1 variant(s) = 4" in capsys.readouterr().out
    assert run_cli("run", inp, "-o", tmp_path / "out", *common) == 2
    assert "FIREWORKS_API_KEY is not set" in capsys.readouterr().err
