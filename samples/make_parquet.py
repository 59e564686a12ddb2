"""Write samples/prompts.parquet from the rows below.

Run from anywhere: ``python samples/make_parquet.py``. The output depends only
on this file and the installed pyarrow version.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

OUT = Path(__file__).with_name("prompts.parquet")

# (topic, prompt)
ROWS: list[tuple[str, str]] = [
    ("science", "Q: Why does ice float on water?\nA:"),
    ("science", "Q: What is the speed of light in a vacuum, in km/s?\nA:"),
    ("science", "Explain photosynthesis in one sentence:"),
    ("science", "Q: What is the most abundant gas in Earth's atmosphere?\nA:"),
    ("science", "The main difference between a virus and a bacterium is"),
    ("history", "Q: In which year did the Berlin Wall fall?\nA:"),
    ("history", "Q: Who was the first emperor of Rome?\nA:"),
    ("history", "The printing press changed Europe because"),
    ("history", "Q: Which empire built Machu Picchu?\nA:"),
    ("history", "Summarize the causes of the First World War in two sentences:"),
    ("geography", "Q: What is the longest river in South America?\nA:"),
    ("geography", "Q: Which country has the most islands?\nA:"),
    ("geography", "Q: What is the capital of New Zealand?\nA:"),
    ("geography", "Name three countries that border Switzerland:"),
    ("geography", "The Sahara Desert stretches across"),
    ("cooking", "A simple way to keep pasta from sticking together is"),
    ("cooking", "Q: What internal temperature makes chicken safe to eat, in °C?\nA:"),
    ("cooking", "List the ingredients of a classic margherita pizza:"),
    ("cooking", "Q: What is the difference between baking soda and baking powder?\nA:"),
    ("cooking", "To make a smooth risotto, the most important step is"),
    ("programming", "Q: What does the `git rebase` command do?\nA:"),
    ("programming", "Write a Python one-liner that reverses a string s:"),
    ("programming", "Q: What is the time complexity of binary search?\nA:"),
    ("programming", "The main advantage of async I/O over threads is"),
    ("programming", "Q: How does a Python list differ from a tuple?\nA:"),
    ("health", "Q: How many hours of sleep do adults typically need?\nA:"),
    ("health", "Three easy ways to drink more water during the day are"),
    ("health", "Q: What vitamin does the skin produce in sunlight?\nA:"),
    ("health", "A good warm-up before running should include"),
    ("health", "Q: What is a normal resting heart rate for adults?\nA:"),
    ("sports", "Q: How many players are on a football (soccer) team on the field?\nA:"),
    ("sports", "Q: How long is a marathon in kilometres?\nA:"),
    ("sports", "The offside rule in football means that"),
    ("sports", "Q: In tennis, what is the score called when both players have 40?\nA:"),
    ("sports", "Explain the scoring in basketball in one sentence:"),
    ("finance", "Q: What is compound interest?\nA:"),
    ("finance", "The difference between a stock and a bond is"),
    ("finance", "Q: What does an index fund track?\nA:"),
    ("finance", "Three common mistakes people make with their first budget are"),
    ("finance", "Q: What does APR stand for?\nA:"),
]


def build_table() -> pa.Table:
    ids = [f"q{n:03d}" for n in range(1, len(ROWS) + 1)]
    schema = pa.schema(
        [("id", pa.string()), ("prompt", pa.string()), ("topic", pa.string())]
    )
    return pa.table(
        {
            "id": ids,
            "prompt": [prompt for _, prompt in ROWS],
            "topic": [topic for topic, _ in ROWS],
        },
        schema=schema,
    )


def main() -> None:
    pq.write_table(build_table(), OUT, compression="zstd")


if __name__ == "__main__":
    main()
