"""``python -m batchrun`` and the ``batchrun`` command."""

from __future__ import annotations

import sys


def main() -> int:
    """Run the command line in a process of its own; returns the exit code."""
    # pyarrow imports NumPy whenever it is installed, and nothing the command
    # line does needs it: hiding it saves about 0.15 s of CPU at every start,
    # a third of batchrun's start-up (pyarrow works without NumPy from 18 on).
    # Only the command's own process does this; ``import batchrun`` in a
    # program of yours leaves NumPy alone.
    if "numpy" not in sys.modules:
        sys.modules["numpy"] = None  # type: ignore[assignment]
    from .cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    raise SystemExit(main())
