"""Promises the repository makes about itself: README set-up commands and CI agree."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _python(
    script: str, out: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a new interpreter with ``out`` as its one argument."""
    return subprocess.run(
        [sys.executable, "-c", script, str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"```bash\n(.*?)```", text, re.S)
    assert block is not None
    return [
        line
        for line in block.group(1).splitlines()
        if line and not line.startswith("#")
    ]


def test_readme_opens_with_two_setup_commands() -> None:
    """The README's first code block holds the install-and-run and test commands."""
    install, test = _readme_commands()
    assert "pip install ." in install
    assert "batchrun run samples/prompts.jsonl" in install
    assert "--provider mock" in install
    assert "pytest" in test


def test_ci_runs_exactly_the_readme_test_command() -> None:
    """.ci/run's command is the README's test command, character for character."""
    _, test = _readme_commands()
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    commands = [
        line
        for line in script.splitlines()
        if line.strip() and not line.startswith(("#", "set ", "cd "))
    ]
    assert commands == [test]


def test_the_command_tunes_its_own_process_only(tmp_path: Path) -> None:
    """The CLI process never imports NumPy (0.15 s of start-up), collects
    cyclic garbage every 10,000 allocations, not 700, gives Arrow the system
    allocator unless told otherwise, and freezes what it has loaded before
    the command runs, with the collector on again.

    ``import batchrun`` as a library, or ``batchrun.cli.main`` called from a
    program, changes none of these.
    """
    script = (
        "import sys\n"
        "from batchrun.__main__ import main\n"
        "sys.argv = ['batchrun', 'status', sys.argv[1]]\n"
        "code = main()\n"
        "import gc\n"
        "import pyarrow as pa\n"
        "numpy = sys.modules.get('numpy', 'absent')\n"
        "pool = pa.default_memory_pool().backend_name\n"
        "print(code, 'pyarrow' in sys.modules, numpy, gc.get_threshold()[0], pool,"
        " gc.get_freeze_count() > 0 and gc.isenabled())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}

    def command(chosen: str | None) -> list[str]:
        pool = {} if chosen is None else {"ARROW_DEFAULT_MEMORY_POOL": chosen}
        done = _python(script, tmp_path / "missing", {**env, **pool})
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert command(None) == ["2", "True", "None", "10000", "system", "True"]
    assert command("mimalloc")[-2] == "mimalloc"
    # A run too keeps the pool the user chose.
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "a", "prompt": "hi"}\n')
    run = script.replace(
        "['batchrun', 'status', sys.argv[1]]",
        f"['batchrun', 'run', {str(inp)!r}, '-o', sys.argv[1], '--provider',"
        " 'mock', '--quiet']",
    )
    done = _python(
        run, tmp_path / "out", {**env, "ARROW_DEFAULT_MEMORY_POOL": "mimalloc"}
    )
    assert done.stdout.split()[::4] == ["0", "mimalloc"], done.stderr
    assert done.stdout.split()[-1] == "True", "a run freezes the loaded modules"
    check = (
        "import sys, batchrun\n"
        "from batchrun.cli import main\n"
        f"main(['run', {str(inp)!r}, '-o', sys.argv[1], '--provider', 'mock',"
        " '--quiet'])\n"
        "import pyarrow as pa\n"
        "numpy = sys.modules.get('numpy', 'absent')\n"
        "import gc\n"
        "pool = pa.default_memory_pool().backend_name\n"
        "print('pyarrow' in sys.modules, numpy is not None, gc.get_threshold()[0],"
        " pool != 'system', gc.get_freeze_count(), gc.isenabled())"
    )
    library = _python(check, tmp_path / "library", env)
    expected = ["True", "True", "700", "True", "0", "True"]
    assert library.stdout.split() == expected, library.stderr


def test_a_run_does_not_import_pyarrow_compute(tmp_path: Path) -> None:
    """pyarrow.compute costs about 45 ms of CPU to import, more than writing
    the part files of 20,000 rows saves by using it; a plain run needs none of
    it (resume, export and sweeps load it when they need it)."""
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": "ho"}\n')
    script = (
        "import sys\n"
        "from batchrun.cli import main\n"
        f"code = main(['run', {str(inp)!r}, '-o', sys.argv[1], '--provider', 'mock',"
        " '--quiet'])\n"
        "print(code, 'pyarrow.parquet' in sys.modules,"
        " 'pyarrow.compute' in sys.modules)\n"
    )
    done = _python(script, tmp_path / "out")
    assert done.stdout.split() == ["0", "True", "False"], done.stderr
