"""Tests for the public surface of ``batchrun``: ``__all__`` and ``__version__``."""

from __future__ import annotations

import importlib
import inspect

import batchrun


def _public_names() -> set[str]:
    """Public names of ``batchrun``: no leading underscore, no modules.

    ``dir()`` includes the names that load on first use. ``from __future__
    import annotations`` binds ``annotations``, which is a compiler directive
    rather than part of the API, so it is left out too.
    """
    return {
        name
        for name in dir(batchrun)
        if not name.startswith("_")
        and not inspect.ismodule(value := getattr(batchrun, name))
        and type(value).__module__ != "__future__"
    }


def _defined_in_batchrun(name: str) -> bool:
    module = getattr(getattr(batchrun, name), "__module__", None)
    return isinstance(module, str) and module.split(".")[0] == "batchrun"


def test_all_is_sorted() -> None:
    """__all__ is sorted and has no repeats."""
    assert batchrun.__all__ == sorted(batchrun.__all__)
    assert len(set(batchrun.__all__)) == len(batchrun.__all__)


def test_all_matches_public_names() -> None:
    """__all__ equals the public names of the package, plus __version__."""
    exported = set(batchrun.__all__)
    public = _public_names() | {"__version__"}
    assert not exported - public, f"in __all__ but not bound: {exported - public}"
    assert not public - exported, f"public but not in __all__: {public - exported}"


def test_every_batchrun_object_is_exported() -> None:
    """Every public batchrun-defined object bound in the package is in __all__."""
    own = {name for name in _public_names() if _defined_in_batchrun(name)}
    assert own <= set(batchrun.__all__)
    assert {"run", "arun", "RunConfig", "RunStats", "APIError"} <= own


def test_every_exported_name_is_importable() -> None:
    """Each name in __all__ can be imported from batchrun."""
    module = importlib.import_module("batchrun")
    for name in batchrun.__all__:
        assert hasattr(module, name), name
        namespace: dict[str, object] = {}
        exec(f"from batchrun import {name}", namespace)
        assert namespace[name] is getattr(batchrun, name)


def test_version_is_non_empty_string() -> None:
    """__version__ is a non-empty string."""
    assert isinstance(batchrun.__version__, str)
    assert batchrun.__version__.strip()
