"""Estimate a run before anything is spent: requests, tokens, cost and time.

Reads the input the way ``run`` does (so a bad row is the same error) and
sends nothing. Prompt tokens are counted offline as words and punctuation
marks (plus OpenAI's framing of 3 tokens per chat message and 3 per reply),
which follows BPE tokenizers on English text to within about a fifth; a real
run learns the true ratio from the usage the server reports.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .config import RunConfig
from .payload import RequestBuilder, cells, columns_of
from .records import PromptRecord
from .scan import scan_inputs
from .sources import expand_inputs, iter_batches

__all__ = ["Estimate", "count_tokens", "estimate_run"]

_TOKEN = re.compile(r"\w+|[^\w\s]")


def count_tokens(text: str) -> int:
    """An offline token count: words and punctuation marks."""
    return len(_TOKEN.findall(text))


def prompt_tokens(record: PromptRecord) -> int:
    """Estimated prompt tokens of one request."""
    body = record.body
    if record.endpoint != "chat":
        prompt = body.get("prompt")
        return count_tokens(prompt) if isinstance(prompt, str) else 0
    total = 3
    for message in body.get("messages", []):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):  # multi-part content: count its text parts
            content = " ".join(
                str(part.get("text", "")) for part in content if isinstance(part, dict)
            )
        total += 3 + count_tokens(content or "")
    return total


def _max_completion(record: PromptRecord) -> int | None:
    body = record.body
    limit = body.get("max_tokens", body.get("max_completion_tokens"))
    n = body.get("n", 1)
    if not isinstance(limit, int) or isinstance(limit, bool):
        return None
    return limit * (n if isinstance(n, int) and n > 0 else 1)


@dataclass(slots=True)
class _ModelTotals:
    prompt_tokens: int = 0
    max_completion: int = 0


@dataclass(slots=True)
class Estimate:
    """What a run would send, at most."""

    rows: int
    variants: int
    requests: int = 0
    prompt_tokens: int = 0
    max_completion_tokens: int = 0
    unbounded: int = 0
    cost_min_usd: float | None = None
    cost_max_usd: float | None = None
    shortest_s: float | None = None
    shortest_at_max_s: float | None = None
    limits: dict[str, float] = field(default_factory=dict)

    def report(self) -> str:
        """A few human lines."""
        lines = [
            f"requests: {self.rows} rows x {self.variants} variant(s)"
            f" = {self.requests}",
            f"prompt tokens (estimated): {self.prompt_tokens}",
        ]
        most = f"completion tokens at most: {self.max_completion_tokens}"
        if self.unbounded:
            most += f" (+ {self.unbounded} requests without max_tokens: unbounded)"
        lines.append(most)
        if self.cost_min_usd is None:
            lines.append(
                "cost: no pricing given (--price-input/--price-output or [pricing])"
            )
        else:
            high = (
                "unbounded"
                if self.unbounded or self.cost_max_usd is None
                else f"${self.cost_max_usd:.4f}"
            )
            lines.append(f"cost: ${self.cost_min_usd:.4f} to {high}")
        if self.shortest_s is None:
            lines.append("shortest duration: no rate limits given (--rpm, --tpm, ...)")
        else:
            at_max = (
                ""
                if self.shortest_at_max_s is None
                else f", {_duration(self.shortest_at_max_s)} if every completion"
                " reaches max_tokens"
            )
            shortest = _duration(self.shortest_s)
            lines.append(f"shortest duration under the limits: {shortest}{at_max}")
        return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def estimate_run(config: RunConfig) -> Estimate:
    """Read the input and estimate the run. Sends nothing; blocking.

    Raises:
        InputError: The same input errors ``run`` would report.
    """
    config = config.with_mock_model()
    files = expand_inputs(config.inputs)
    plan = cells(config.request, config.variants)
    base = RequestBuilder(config.request)
    scan = scan_inputs(files, base, [b for _, b in plan], limit=config.limit)
    estimate = Estimate(rows=scan.total, variants=len(plan))
    per_model: dict[str, _ModelTotals] = {}
    columns = columns_of(b for _, b in plan)
    position = 0
    for batch in iter_batches(files, columns=columns, limit=config.limit):
        for row in batch.rows:
            row_id = base.row_id(row, position)
            position += 1
            for _, builder in plan:
                record = builder.build(row, row_id, hashed=False)
                tokens = prompt_tokens(record)
                most = _max_completion(record)
                estimate.requests += 1
                estimate.prompt_tokens += tokens
                totals = per_model.setdefault(record.model, _ModelTotals())
                totals.prompt_tokens += tokens
                if most is None:
                    estimate.unbounded += 1
                else:
                    estimate.max_completion_tokens += most
                    totals.max_completion += most
    _add_cost(estimate, config, per_model)
    _add_duration(estimate, config)
    return estimate


def _add_cost(
    estimate: Estimate, config: RunConfig, per_model: dict[str, _ModelTotals]
) -> None:
    low = high = 0.0
    priced = False
    for model, totals in per_model.items():
        price = config.pricing.get(model) or config.pricing.get("*")
        if price is None:
            continue
        priced = True
        low += price.cost(totals.prompt_tokens, 0)
        high += price.cost(totals.prompt_tokens, totals.max_completion)
    if priced:
        estimate.cost_min_usd, estimate.cost_max_usd = low, high


def _add_duration(estimate: Estimate, config: RunConfig) -> None:
    limits = config.limits
    prompt, completion = estimate.prompt_tokens, estimate.max_completion_tokens

    def minutes(with_completion: int) -> float | None:
        needs = [
            (limits.rpm, estimate.requests),
            (limits.tpm, prompt + with_completion),
            (limits.prompt_tpm, prompt),
            (limits.completion_tpm, with_completion),
        ]
        spans = [amount / limit for limit, amount in needs if limit]
        return max(spans) if spans else None

    low, high = minutes(0), minutes(completion)
    estimate.shortest_s = None if low is None else low * 60
    estimate.shortest_at_max_s = None if high is None or high == low else high * 60
