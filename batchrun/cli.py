"""The command line: parse arguments, build a ``RunConfig``, call ``run``.

No batch logic lives here. This module reads the environment (API keys,
``BATCHRUN_BASE_URL``), prints one-line errors, and maps outcomes to exit codes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shlex
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._version import __version__
from .config import (
    DEFAULT_CONCURRENCY,
    DEFAULT_GRACE_S,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_RETRY_TIME_S,
    DEFAULT_MAX_RETRY_WAIT_S,
    DEFAULT_TIMEOUT_S,
    PROVIDERS,
    SAMPLING,
    EndpointConfig,
    OutputOptions,
    Price,
    ProgressMode,
    RateLimits,
    RequestOptions,
    RetryPolicy,
    RunConfig,
)
from .errors import (
    BatchrunError,
    ConfigError,
    FatalAPIError,
    InputError,
    OutputError,
)
from .jobfile import Job, inputs_of, load_job, to_tokens, where_in

__all__ = [
    "EXIT_ABORTED",
    "EXIT_FAILED_ROWS",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TERMINATED",
    "EXIT_USAGE",
    "main",
]

EXIT_OK = 0
EXIT_FAILED_ROWS = 1
EXIT_USAGE = 2
EXIT_ABORTED = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

_EPILOG = """\
examples:
  # a real job on the built-in simulator, no key needed
  batchrun run samples/prompts.jsonl -o runs/demo --provider mock

  # Fireworks, key from FIREWORKS_API_KEY
  batchrun run samples/chat.jsonl -o runs/chat --provider fireworks \\
      --model accounts/fireworks/models/llama-v3p1-8b-instruct --max-tokens 128

  # any OpenAI-compatible server, a template over the columns of each row
  batchrun run samples/reviews.jsonl -o runs/reviews \\
      --base-url http://localhost:8000/v1 --model my-model \\
      --template-file samples/classify.j2 --max-tokens 4

  # where a long run stands (safe while it runs); the same command resumes it
  batchrun status runs/demo

exit codes: 0 all rows ok, 1 some rows failed, 2 usage/config/input error,
            3 aborted (bad key/model/URL, quota used up, untrusted TLS
              certificate, 50 rows failing alike, output unwritable),
            130 stopped by Ctrl-C, 143 stopped by SIGTERM (run again to resume)
"""

# (flag, body field, type) for the sampling parameters sent only when given.
_SAMPLING: tuple[tuple[str, str, type], ...] = tuple(
    ("--" + field.replace("_", "-"), field, kind) for field, kind in SAMPLING
)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line and exit 2."""

    def error(self, message: str) -> Any:
        raise ConfigError(message)


def _add_run_options(run: argparse.ArgumentParser) -> None:
    """The options of ``run`` (and ``estimate``, which takes the same)."""
    run.add_argument(
        "inputs",
        nargs="*",
        type=Path,
        metavar="INPUT",
        help="JSONL (.jsonl, .json, .jsonl.gz) or Parquet file or directory",
    )
    run.add_argument(
        "-o",
        "--output",
        type=Path,
        metavar="OUT",
        help="output directory",
    )
    run.add_argument(
        "--verbose", action="store_true", help="show tracebacks for errors"
    )

    ep = run.add_argument_group("endpoint")
    ep.add_argument(
        "--provider",
        choices=sorted(PROVIDERS),
        help="preset base URL and key variable; 'mock' runs the simulator",
    )
    ep.add_argument(
        "--base-url",
        metavar="URL",
        help="OpenAI-compatible base URL (default: $BATCHRUN_BASE_URL)",
    )
    ep.add_argument(
        "--api-key-env", metavar="VAR", help="environment variable holding the API key"
    )
    ep.add_argument("--model", help="model for rows whose body names none")
    ep.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help="seconds a request may take from sending to the last byte"
        f" (default {DEFAULT_TIMEOUT_S:g})",
    )
    ep.add_argument(
        "--probe",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="send the first request alone and follow the rate limits its answer"
        " states before sending more (default: unless the server is on this"
        " machine)",
    )
    ep.add_argument(
        "--concurrency",
        type=int,
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help=f"requests in flight (default {DEFAULT_CONCURRENCY})",
    )

    rq = run.add_argument_group("requests")
    rq.add_argument(
        "--endpoint",
        choices=("completions", "chat"),
        help="force the endpoint (default: inferred per row)",
    )
    tpl = rq.add_mutually_exclusive_group()
    tpl.add_argument(
        "--template", metavar="TEXT", help="Jinja2 template over row columns"
    )
    tpl.add_argument(
        "--template-file",
        type=Path,
        metavar="PATH",
        help="read the template from a file",
    )
    rq.add_argument("--system", metavar="TEXT", help="system message for chat requests")
    rq.add_argument(
        "--prompt-column",
        default="prompt",
        metavar="COL",
        help="field holding the raw prompt (default prompt)",
    )
    rq.add_argument(
        "--messages-column",
        default="messages",
        metavar="COL",
        help="field holding chat messages (default messages)",
    )
    for flag, field, kind in _SAMPLING:
        rq.add_argument(
            flag,
            type=kind,
            default=None,
            metavar=kind.__name__.upper(),
            help=f"body field {field} (sent only when given)",
        )
    rq.add_argument(
        "--stop", action="append", metavar="TEXT", help="stop sequence (repeatable)"
    )
    rq.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra body field; VALUE is parsed as JSON when it parses",
    )
    rq.add_argument(
        "--id-column",
        metavar="COL",
        help="row id field (default: id, then custom_id, then position)",
    )
    rq.add_argument(
        "--keep-columns", metavar="A,B", help="input columns to copy into the results"
    )
    rq.add_argument(
        "--limit",
        type=int,
        metavar="N",
        help="only the first N input rows, to try a job out; the same command"
        " without it then does the rest",
    )

    lim = run.add_argument_group("rate limits and retries")
    lim.add_argument("--rpm", type=float, metavar="N", help="requests per minute")
    lim.add_argument(
        "--tpm", type=float, metavar="N", help="prompt + completion tokens per minute"
    )
    lim.add_argument(
        "--prompt-tpm", type=float, metavar="N", help="prompt tokens per minute"
    )
    lim.add_argument(
        "--completion-tpm",
        type=float,
        metavar="N",
        help="completion (generated) tokens per minute",
    )
    lim.add_argument(
        "--max-attempts",
        type=int,
        default=DEFAULT_MAX_ATTEMPTS,
        metavar="N",
        help=f"attempts per row (default {DEFAULT_MAX_ATTEMPTS})",
    )
    lim.add_argument(
        "--max-retry-time",
        type=float,
        default=DEFAULT_MAX_RETRY_TIME_S,
        metavar="S",
        help="give up on a row this long after its first attempt"
        f" (default {DEFAULT_MAX_RETRY_TIME_S:g})",
    )
    lim.add_argument(
        "--max-retry-wait",
        type=float,
        default=DEFAULT_MAX_RETRY_WAIT_S,
        metavar="S",
        help=f"longest Retry-After honoured (default {DEFAULT_MAX_RETRY_WAIT_S:g})",
    )

    out = run.add_argument_group("output and resume")
    out.add_argument(
        "--overwrite",
        action="store_true",
        help="delete earlier results in OUT and start afresh",
    )
    out.add_argument(
        "--skip-failed",
        action="store_true",
        help="on resume, keep earlier error rows instead of retrying them",
    )
    out.add_argument(
        "--fsync",
        action="store_true",
        help="force each journal write to disk (survives power loss)",
    )
    out.add_argument(
        "--grace",
        type=float,
        default=DEFAULT_GRACE_S,
        metavar="S",
        help="on Ctrl-C, SIGTERM or an abort, let requests in flight finish this long"
        f" (default {DEFAULT_GRACE_S:g})",
    )
    out.add_argument(
        "--no-raw", action="store_true", help="do not keep the raw response body"
    )
    out.add_argument("--quiet", action="store_true", help="no progress display")
    out.add_argument(
        "--event-loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="auto: uvloop when installed (pip install 'batchrun[fast]')",
    )
    out.add_argument(
        "--progress",
        choices=("auto", "bar", "lines", "off"),
        default="auto",
        help="progress display (default auto: a bar on a terminal)",
    )
    run.add_argument(
        "--config",
        type=Path,
        metavar="JOB.toml",
        help="read options, [sweep], [[variant]] and [pricing] from a job file;"
        " flags given here win",
    )
    cost = run.add_argument_group("cost")
    cost.add_argument(
        "--price-input",
        type=float,
        metavar="USD",
        help="USD per million prompt tokens (job files can price each model)",
    )
    cost.add_argument(
        "--price-output",
        type=float,
        metavar="USD",
        help="USD per million completion tokens",
    )


def _build_parser() -> tuple[
    argparse.ArgumentParser, dict[str, argparse.ArgumentParser]
]:
    """The parser, and the subcommands' parsers by name."""
    parser = _Parser(
        prog="batchrun",
        description="Run large batches of LLM requests against OpenAI-compatible APIs.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"batchrun {__version__}"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show tracebacks for errors"
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser(
        "run",
        help="run a batch",
        description="Send one request per input row (per sweep cell) and write"
        " results to OUT. Running it again resumes.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_run_options(run)
    estimate = sub.add_parser(
        "estimate",
        help="estimate tokens, cost and duration without sending anything",
        description="Read the input like 'run' would and print rows x variants,"
        " prompt tokens, the most completion tokens, the cost range and the"
        " shortest duration under the rate limits. Sends no request.",
    )
    _add_run_options(estimate)
    export = sub.add_parser(
        "export",
        help="export results to OpenAI batch format, JSONL or one Parquet file",
        description="Write the results in OUT (each id once, latest wins) to FILE.",
    )
    export.add_argument("output", type=Path, metavar="OUT")
    export.add_argument(
        "--format",
        required=True,
        choices=("openai-batch", "jsonl", "parquet"),
        help="openai-batch: Batch API output lines; jsonl: flat rows; parquet",
    )
    export.add_argument("-o", dest="dest", required=True, type=Path, metavar="FILE")

    status = sub.add_parser(
        "status",
        help="show where a run stands",
        description="Show rows ok and failed, tokens so far, the last write and"
        " whether the run finished. Safe while the run is going.",
    )
    status.add_argument("output", type=Path, metavar="OUT")

    mock = sub.add_parser(
        "serve-mock",
        help="serve the OpenAI-compatible simulator",
        description="Serve the OpenAI-compatible simulator until Ctrl-C.",
    )
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=8000)
    mock.add_argument(
        "--latency-ms",
        type=float,
        default=0.0,
        metavar="MS",
        help="added to every response",
    )
    mock.add_argument("--seed", type=int, default=0, help="seeds text and faults")
    mock.add_argument(
        "--fast",
        action="store_true",
        help="serve from a minimal HTTP server for benchmarks (the same answers;"
        " no rate limits, faults or scripting)",
    )
    mock.add_argument("--rpm", type=int, metavar="N", help="server-side requests/min")
    mock.add_argument("--tpm", type=int, metavar="N", help="server-side tokens/min")
    mock.add_argument(
        "--completion-tpm",
        type=int,
        metavar="N",
        help="server-side completion tokens/min",
    )
    mock.add_argument(
        "--burst-s",
        type=float,
        default=1.0,
        metavar="S",
        help="bucket capacity in seconds of the limit (default 1)",
    )
    mock.add_argument(
        "--header-style",
        choices=("openai", "fireworks", "none"),
        default="openai",
        help="rate-limit header names ('none': only 429 and Retry-After)",
    )
    mock.add_argument(
        "--fail-rate",
        type=float,
        default=0.0,
        metavar="P",
        help="fraction answered 500 or 503",
    )
    mock.add_argument(
        "--drop-rate",
        type=float,
        default=0.0,
        metavar="P",
        help="fraction whose connection drops mid-response",
    )
    mock.add_argument(
        "--malformed-rate",
        type=float,
        default=0.0,
        metavar="P",
        help="fraction answered with truncated JSON",
    )
    mock.add_argument(
        "--slow-rate",
        type=float,
        default=0.0,
        metavar="P",
        help="fraction answered after --slow-ms",
    )
    mock.add_argument("--slow-ms", type=float, default=5000.0, metavar="MS")
    mock.add_argument(
        "--require-key-env",
        metavar="VAR",
        help="answer 401 unless the bearer token equals $VAR",
    )
    return parser, {"run": run, "estimate": estimate}


def _parse_param(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"--param expects KEY=VALUE, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def _endpoint(args: argparse.Namespace, *, need_key: bool = True) -> EndpointConfig:
    """The endpoint the options name; ``need_key``: a named key variable must
    be set (``estimate`` sends nothing, so it runs before a key exists)."""
    preset = PROVIDERS[args.provider] if args.provider else None
    base_url = args.base_url or os.environ.get("BATCHRUN_BASE_URL") or None
    mock = args.provider == "mock"
    if mock and args.base_url:
        raise ConfigError("--provider mock cannot be combined with --base-url")
    if mock:
        base_url = None
    elif base_url is None and preset is not None:
        base_url = preset.base_url
    if base_url is None and not mock:
        raise ConfigError(
            "no endpoint: give --provider, --base-url or set BATCHRUN_BASE_URL"
        )
    key_env = args.api_key_env or (preset.key_env if preset else None)
    api_key = None
    if key_env:
        api_key = os.environ.get(key_env) or None
        if api_key is None and need_key:
            raise ConfigError(f"the API key variable {key_env} is not set")
    elif not mock and args.provider is None:
        api_key = os.environ.get("OPENAI_API_KEY") or None
    return EndpointConfig(
        base_url=base_url,
        api_key=api_key,
        mock=mock,
        timeout_s=args.timeout,
        probe=args.probe,
    )


def _with_job(
    parser: argparse.ArgumentParser,
    commands: dict[str, argparse.ArgumentParser],
    args: argparse.Namespace,
    argv: list[str],
) -> tuple[argparse.Namespace, Job | None]:
    """Merge ``--config JOB.toml`` into the arguments; flags given win."""
    if args.config is None:
        return args, None
    command = commands[args.command]
    flags: dict[str, str] = {}
    switches: set[str] = set()  # flags without a value: true or false in a job
    negations: dict[str, str] = {}  # --probe: false is --no-probe
    for action in command._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if longs and action.dest not in ("help", "config"):
            flags.setdefault(action.dest, longs[0])
            if action.nargs == 0:
                switches.add(action.dest)
            if isinstance(action, argparse.BooleanOptionalAction):
                negations[action.dest] = longs[1]
    known = {*flags, "inputs"}
    job = load_job(args.config, known, switches)
    given = {
        dest
        for dest, flag in flags.items()
        for token in argv
        if token == flag or token.startswith(flag + "=")
    }
    tokens = to_tokens(job.options, flags, given, negations)
    position = argv.index(args.command) + 1
    inputs = [] if args.inputs else list(inputs_of(job.options))
    merged = [*argv[:position], *inputs, *tokens, *argv[position:]]
    try:
        return parser.parse_args(merged), job
    except ConfigError as exc:
        # "argument --max-tokens: invalid int value" about a value from the
        # file names the file, line and key instead of a flag nobody typed.
        found = re.match(r"argument (--[\w-]+)(?:/--[\w-]+)?: (.*)", str(exc))
        by_flag = {flag: dest for dest, flag in flags.items()}
        dest = by_flag.get(found.group(1)) if found else None
        if found is None or dest is None or dest in given or dest not in job.options:
            raise
        raise ConfigError(f"{where_in(job, dest)}: {dest}: {found.group(2)}") from None


def _pricing(args: argparse.Namespace, job: Job | None) -> dict[str, Price]:
    prices = dict(job.pricing) if job is not None else {}
    if args.price_input is not None or args.price_output is not None:
        prices.setdefault(
            "*",
            Price(
                input_per_m=args.price_input or 0.0,
                output_per_m=args.price_output or 0.0,
            ),
        )
    return prices


def _run_config(
    args: argparse.Namespace, job: Job | None, *, estimate: bool = False
) -> RunConfig:
    params: dict[str, Any] = {}
    for _, field, _ in _SAMPLING:
        value = getattr(args, field)
        if value is not None:
            params[field] = value
    if args.stop:
        params["stop"] = args.stop
    for item in args.param:
        key, value = _parse_param(item)
        params[key] = value
    template = args.template
    if args.template_file is not None:
        try:
            template = args.template_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"cannot read template file {args.template_file}: {exc.strerror}"
            ) from exc
    keep = tuple(c.strip() for c in (args.keep_columns or "").split(",") if c.strip())
    progress: ProgressMode = "off" if args.quiet else args.progress
    if args.output is None and not estimate:
        raise ConfigError("-o OUT is required (or output in the job file)")
    if estimate and not (args.provider or args.base_url):
        # Nothing is sent: any endpoint will do for the estimate.
        endpoint = EndpointConfig(mock=True)
    else:
        endpoint = _endpoint(args, need_key=not estimate)
    return RunConfig(
        inputs=tuple(args.inputs),
        output=OutputOptions(
            out_dir=args.output or Path("."),
            overwrite=args.overwrite,
            raw_response=not args.no_raw,
            skip_failed=args.skip_failed,
            fsync=args.fsync,
        ),
        endpoint=endpoint,
        request=RequestOptions(
            model=args.model,
            endpoint=args.endpoint,
            template=template,
            system=args.system,
            prompt_column=args.prompt_column,
            messages_column=args.messages_column,
            params=params,
            id_column=args.id_column,
            keep_columns=keep,
        ),
        concurrency=args.concurrency,
        limits=RateLimits(
            rpm=args.rpm,
            tpm=args.tpm,
            prompt_tpm=args.prompt_tpm,
            completion_tpm=args.completion_tpm,
        ),
        retry=RetryPolicy(
            max_attempts=args.max_attempts,
            max_retry_time_s=args.max_retry_time,
            max_retry_wait_s=args.max_retry_wait,
        ),
        progress=progress,
        grace_s=args.grace,
        event_loop=args.event_loop,
        variants=job.variants if job is not None else (),
        pricing=_pricing(args, job),
        limit=args.limit,
    )


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _tell(text: str, *, report: bool = False) -> None:
    """A message on stderr, or a ``report`` on stdout (``status``,
    ``estimate``). Nobody reading it (a closed pipe: ``2>&1 | head``, or a
    reader that took the lines it wanted) changes nothing: the outcome is in
    OUT and in the exit code."""
    try:
        print(text, file=sys.stdout if report else sys.stderr, flush=True)
    except OSError:
        # Later writes, and the interpreter's flush at exit, go nowhere.
        nowhere = open(os.devnull, "w")  # noqa: SIM115 (kept to the end)
        if report:
            sys.stdout = nowhere
        else:
            sys.stderr = nowhere


def _resume_command(argv: Sequence[str]) -> str:
    """The command that continues this run (never with --overwrite)."""
    return shlex.join(["batchrun", *(a for a in argv if a != "--overwrite")])


def _cmd_run(args: argparse.Namespace, job: Job | None, argv: Sequence[str]) -> int:
    from .runner import run

    stats = run(_run_config(args, job))
    if stats.stopped_by is not None:
        _tell(stats.summary())
        _tell(
            f"batchrun: stopped by {stats.stopped_by}; results so far are saved."
            f" Resume with:\n  {_resume_command(argv)}"
        )
        return EXIT_TERMINATED if stats.stopped_by == "SIGTERM" else EXIT_INTERRUPTED
    if not args.quiet:
        _tell(stats.summary())
    return EXIT_OK if stats.failed == 0 else EXIT_FAILED_ROWS


def _cmd_estimate(args: argparse.Namespace, job: Job | None) -> int:
    from .estimate import estimate_run

    _tell(estimate_run(_run_config(args, job, estimate=True)).report(), report=True)
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import export_results

    rows = export_results(args.output, args.format, args.dest)
    _tell(f"wrote {rows} rows to {args.dest}")
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    from .resume import status_report

    _tell(status_report(args.output), report=True)
    return EXIT_OK


def _cmd_serve_mock(args: argparse.Namespace) -> int:
    from .simulator import SimulatorConfig, run_simulator

    api_key = None
    if args.require_key_env:
        api_key = os.environ.get(args.require_key_env) or None
        if api_key is None:
            raise ConfigError(f"the key variable {args.require_key_env} is not set")
    config = SimulatorConfig(
        latency_ms=args.latency_ms,
        seed=args.seed,
        api_key=api_key,
        rpm=args.rpm,
        tpm=args.tpm,
        completion_tpm=args.completion_tpm,
        burst_s=args.burst_s,
        header_style=args.header_style,
        fail_rate=args.fail_rate,
        drop_rate=args.drop_rate,
        malformed_rate=args.malformed_rate,
        slow_rate=args.slow_rate,
        slow_ms=args.slow_ms,
    )

    unsupported = config.beyond_fast_path() if args.fast else []
    if unsupported:
        flags = ", ".join("--" + name.replace("_", "-") for name in unsupported)
        raise ConfigError(f"--fast cannot serve {flags}")

    def ready(url: str) -> None:
        print(f"batchrun simulator serving {url}", file=sys.stderr, flush=True)

    try:
        run_simulator(
            config, host=args.host, port=args.port, on_ready=ready, fast=args.fast
        )
    except OSError as exc:
        where = f"{args.host}:{args.port}"
        raise ConfigError(f"cannot listen on {where}: {exc.strerror or exc}") from exc
    return EXIT_OK


def _settle(command: str) -> None:
    """Load the command's modules, freeze them, and turn the collector back on.

    ``__main__`` turns the cyclic garbage collector off before anything is
    imported, and frozen, the modules are never walked again, during the run
    or at exit. Collections in a 20,000-row run took 49 ms of CPU before (five
    while modules loaded, finding about 1,700 objects; 15 ms as the run began;
    19 ms at exit) and take 3-5 ms now (measured with ``gc.callbacks``). The
    cyclic garbage import leaves behind is frozen with the rest, for good.
    """
    if command == "run":
        from . import runner  # noqa: F401  (loaded before the freeze)
    gc.freeze()
    gc.enable()


def main(argv: Sequence[str] | None = None, *, own_process: bool = False) -> int:
    """Run the command line; returns the exit code.

    Args:
        argv: Arguments without the program name; ``None`` reads ``sys.argv``.
        own_process: The command has the process to itself (``batchrun`` and
            ``python -m batchrun``), which started with the cyclic garbage
            collector off; see ``_settle``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = "--verbose" in argv
    error: BatchrunError
    try:
        parser, commands = _build_parser()
        args = parser.parse_args(argv)
        if own_process:
            _settle(args.command)
        if args.command == "serve-mock":
            return _cmd_serve_mock(args)
        if args.command == "status":
            return _cmd_status(args)
        if args.command == "export":
            return _cmd_export(args)
        args, job = _with_job(parser, commands, args, argv)
        if args.command == "estimate":
            return _cmd_estimate(args, job)
        return _cmd_run(args, job, argv)
    except KeyboardInterrupt:
        _tell("batchrun: interrupted; finished results are saved")
        if own_process:
            # The exit waits for a thread to end its batch. Another Ctrl-C
            # meanwhile means now, and printed a traceback from the
            # interpreter's exit: end as a kill would, which loses nothing.
            signal.signal(signal.SIGINT, lambda *_: os._exit(EXIT_INTERRUPTED))
        return EXIT_INTERRUPTED
    except (ConfigError, InputError) as exc:
        code, error = EXIT_USAGE, exc
    except (FatalAPIError, OutputError, BatchrunError) as exc:
        code, error = EXIT_ABORTED, exc
    if verbose:
        traceback.print_exception(error, file=sys.stderr)
    _tell(f"batchrun: error: {_one_line(error)}")
    return code
