"""Job files: every ``batchrun run`` option in TOML, plus sweeps and pricing.

A job file is turned into command-line tokens, so every option is checked by
the same parser, and a flag given on the command line wins over the file.
``[sweep]`` expands a grid of models, parameters and named templates, and
``[[variant]]`` tables add explicit cells; ``[pricing."<model>"]`` gives USD
per million tokens. This module reads files; it sends nothing.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import SAMPLING, Price, Variant
from .errors import ConfigError

__all__ = ["Job", "load_job", "to_tokens", "where_in"]

SECTIONS = ("sweep", "variant", "pricing")
# Sweep dimensions that are not body parameters.
_MODEL, _TEMPLATE, _TEMPLATE_FILE = "model", "template", "template_file"


@dataclass(frozen=True, slots=True)
class Job:
    """What a job file holds.

    Attributes:
        options: Run options, by their command-line name with underscores.
        variants: Sweep cells, grid and explicit ones.
        pricing: USD per million tokens by model.
        path: The file.
    """

    options: dict[str, Any]
    variants: tuple[Variant, ...] = ()
    pricing: dict[str, Price] = field(default_factory=dict)
    path: Path = Path()


def _line_of(text: str, key: str) -> int | None:
    name = re.escape(key)
    pattern = re.compile(rf"^\s*(\[+\s*)?(\"{name}\"|'{name}'|{name})\s*[=\].]")
    for number, line in enumerate(text.splitlines(), start=1):
        if pattern.match(line):
            return number
    return None


def _where(path: Path, text: str, key: str) -> str:
    line = _line_of(text, key)
    return f"{path}:{line}" if line is not None else str(path)


def where_in(job: Job, key: str) -> str:
    """``FILE:LINE`` of option ``key`` in the job file (``FILE`` if not found)."""
    try:
        text = job.path.read_text(encoding="utf-8")
    except OSError:
        return str(job.path)
    return _where(job.path, text, key)


def _unknown(
    path: Path, text: str, key: str, known: Iterable[str], what: str
) -> ConfigError:
    import difflib  # only for a wrong key: not at every start

    guess = difflib.get_close_matches(key, list(known), n=1)
    hint = f"; did you mean {guess[0]!r}?" if guess else ""
    return ConfigError(f"{_where(path, text, key)}: unknown {what} {key!r}{hint}")


def load_job(path: Path, known: Collection[str], switches: Collection[str] = ()) -> Job:
    """Read and check a job file.

    Args:
        path: The TOML file.
        known: Option names (command-line names with underscores) it may set.
        switches: The options that are flags without a value: ``true`` or
            ``false`` in the file.

    Raises:
        ConfigError: The file cannot be read or parsed, or a key is unknown or
            has the wrong kind of value (naming the key and its line).
    """
    import tomllib  # only with a job file: 5 ms of every start otherwise

    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(
            f"cannot read job file {path}: {exc.strerror or exc}"
        ) from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    options: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = raw_key.replace("-", "_")
        if key in SECTIONS:
            continue
        if key not in known:
            raise _unknown(path, text, raw_key, [*known, *SECTIONS], "key")
        if key in switches and not isinstance(value, bool):
            raise ConfigError(
                f"{_where(path, text, raw_key)}: {raw_key} must be true or false,"
                f" got {value!r}"
            )
        options[key] = value
    base = path.parent
    for key in ("inputs", "output", "template_file"):
        if key in options:
            options[key] = _resolve(options[key], base)
    sweep = data.get("sweep", {})
    explicit = data.get("variant", [])
    if not isinstance(sweep, dict):
        raise ConfigError(f"{_where(path, text, 'sweep')}: [sweep] must be a table")
    if not isinstance(explicit, list):
        raise ConfigError(f"{_where(path, text, 'variant')}: use [[variant]] tables")
    templates = _templates(sweep, base, path, text)
    variants = _grid(sweep, templates, known, path, text)
    variants += [
        _explicit(item, templates, known, base, path, text) for item in explicit
    ]
    return Job(
        options=options,
        variants=tuple(variants),
        pricing=_pricing(data.get("pricing", {}), path, text),
        path=path,
    )


def _resolve(value: Any, base: Path) -> Any:
    """Paths in a job file are relative to the file."""
    if isinstance(value, str):
        return str(base / value) if not Path(value).is_absolute() else value
    if isinstance(value, list):
        return [_resolve(item, base) for item in value]
    return value


def _templates(
    sweep: Mapping[str, Any], base: Path, path: Path, text: str
) -> dict[str, str]:
    """Named templates from ``template = {...}`` and ``template_file = {...}``."""
    named: dict[str, str] = {}
    for key in (_TEMPLATE, _TEMPLATE_FILE):
        table = sweep.get(key, {})
        if not isinstance(table, dict) or not all(
            isinstance(v, str) for v in table.values()
        ):
            raise ConfigError(
                f"{_where(path, text, key)}: sweep.{key} must be a table of name = text"
            )
        for name, value in table.items():
            if key == _TEMPLATE_FILE:
                file = Path(value) if Path(value).is_absolute() else base / value
                try:
                    value = file.read_text(encoding="utf-8")
                except OSError as exc:
                    raise ConfigError(
                        f"{_where(path, text, key)}: cannot read template {file}:"
                        f" {exc.strerror or exc}"
                    ) from exc
            named[name] = value
    return named


def _value_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _cell(
    model: str | None,
    template: str | None,
    templates: Mapping[str, str],
    params: Mapping[str, Any],
    name: str | None = None,
) -> Variant:
    columns: dict[str, Any] = {} if template is None else {"template": template}
    columns.update(params)
    parts = [] if model is None else [f"model={model}"]
    parts += [f"{key}={_value_text(columns[key])}" for key in sorted(columns)]
    return Variant(
        name=name or ",".join(parts) or "default",
        model=model,
        template=None if template is None else templates[template],
        params=dict(params),
        columns=columns,
    )


def _grid(
    sweep: Mapping[str, Any],
    templates: Mapping[str, str],
    known: Collection[str],
    path: Path,
    text: str,
) -> list[Variant]:
    """The cartesian product of the sweep's lists."""
    dims: dict[str, list[Any]] = {}
    for key, values in sweep.items():
        if key in (_TEMPLATE, _TEMPLATE_FILE):
            continue
        if not isinstance(values, list) or not values:
            raise ConfigError(
                f"{_where(path, text, key)}: sweep.{key} must be a non-empty list"
            )
        dims[key] = values
    if templates:
        dims[_TEMPLATE] = list(templates)
    if not dims:
        return []
    keys = list(dims)
    cells = []
    for combo in itertools.product(*(dims[k] for k in keys)):
        chosen = dict(zip(keys, combo, strict=True))
        model = chosen.pop(_MODEL, None)
        template = chosen.pop(_TEMPLATE, None)
        cells.append(
            _cell(model, template, templates, _params(chosen, known, path, text))
        )
    return cells


# Options that are also body fields: a sweep may vary them.
_BODY_OPTIONS = frozenset(field for field, _ in SAMPLING) | {"stop"}


def _params(
    chosen: Mapping[str, Any], known: Collection[str], path: Path, text: str
) -> dict[str, Any]:
    """Sweep keys are body fields; the CLI's dashes become underscores.

    Raises:
        ConfigError: A key is the prompt, or an option of batchrun's own
            (``system``, ``endpoint``, ...): as a body field it would be sent
            to the server, and it clashed with the results' own columns.
    """
    params = {}
    for raw_key, value in chosen.items():
        key = raw_key.replace("-", "_")
        if key in ("prompt", "messages"):
            raise ConfigError(
                f"{_where(path, text, raw_key)}: cannot sweep over {key!r}"
            )
        if key in known and key not in _BODY_OPTIONS:
            raise ConfigError(
                f"{_where(path, text, raw_key)}: {key!r} is an option of batchrun's,"
                " and a sweep or variant varies body fields (besides model and"
                " template): it would be sent to the server as a field named"
                f" {key!r}"
            )
        params[key] = value
    return params


def _explicit(
    item: Any,
    templates: Mapping[str, str],
    known: Collection[str],
    base: Path,
    path: Path,
    text: str,
) -> Variant:
    """One ``[[variant]]`` table."""
    if not isinstance(item, dict):
        raise ConfigError(
            f"{_where(path, text, 'variant')}: [[variant]] must be a table"
        )
    item = dict(item)
    name = item.pop("name", None)
    model = item.pop(_MODEL, None)
    template = item.pop(_TEMPLATE, None)
    named = dict(templates)
    if template is not None and template not in named:
        # Not a sweep template name: the template text itself.
        named[template] = template
    params = item.pop("params", {})
    if not isinstance(params, dict):
        raise ConfigError(
            f"{_where(path, text, 'params')}: variant params must be a table"
        )
    params = {**params, **_params(item, known, path, text)}
    return _cell(model, template, named, params, name)


def _pricing(data: Any, path: Path, text: str) -> dict[str, Price]:
    if not isinstance(data, dict):
        raise ConfigError(f"{_where(path, text, 'pricing')}: [pricing] must be a table")
    prices = {}
    for model, entry in data.items():
        if not isinstance(entry, dict) or set(entry) - {"input", "output"}:
            raise ConfigError(
                f"{_where(path, text, model)}: pricing.{model!r} takes input and"
                " output (USD per million tokens)"
            )
        prices[model] = Price(
            input_per_m=float(entry.get("input", 0.0)),
            output_per_m=float(entry.get("output", 0.0)),
        )
    return prices


def to_tokens(
    options: Mapping[str, Any],
    flags: Mapping[str, str],
    given: Collection[str],
    negations: Mapping[str, str] | None = None,
) -> list[str]:
    """Command-line tokens for the job's options not given on the command line.

    Args:
        options: The job file's options.
        flags: Option name to its flag (``max_tokens`` -> ``--max-tokens``).
        given: Option names the command line sets; those win.
        negations: Option name to the flag that turns it off (``probe`` ->
            ``--no-probe``), for options whose default is neither.
    """
    tokens: list[str] = []
    for key, value in options.items():
        if key in given or key == "inputs":
            continue
        flag = flags[key]
        if isinstance(value, bool):
            if value:
                tokens.append(flag)
            elif negations and key in negations:
                tokens.append(negations[key])
        elif key == "param" and isinstance(value, dict):
            tokens += [
                t for k, v in value.items() for t in (flag, f"{k}={json.dumps(v)}")
            ]
        elif key == "keep_columns" and isinstance(value, list):
            tokens += [flag, ",".join(map(str, value))]
        elif isinstance(value, list):
            tokens += [t for v in value for t in (flag, _value_text(v))]
        else:
            tokens += [flag, _value_text(value)]
    return tokens


def inputs_of(options: Mapping[str, Any]) -> Sequence[str]:
    """The job's input paths."""
    value = options.get("inputs", [])
    return [value] if isinstance(value, str) else list(value)
