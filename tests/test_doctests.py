"""Every docstring example in the package runs and is right (the docs cannot rot)."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import visual_memory

# `__main__` modules run the CLI on import.
MODULES = sorted(m.name for m in pkgutil.walk_packages(visual_memory.__path__, "visual_memory.") if not m.name.endswith("__main__"))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    module = importlib.import_module(name)
    failures, _ = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert failures == 0
