"""The examples in the package's docstrings (``>>>``) run and print what they say."""
from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import shortcut_ext


def _modules_with_examples():
    names = []
    for info in pkgutil.walk_packages(shortcut_ext.__path__, "shortcut_ext."):
        spec = importlib.util.find_spec(info.name)
        origin = getattr(spec, "origin", None) or ""
        if origin.endswith(".py") and ">>>" in open(origin, encoding="utf-8").read():
            names.append(info.name)
    return sorted(names)


MODULES = _modules_with_examples()


def test_examples_were_found():
    assert len(MODULES) >= 5, MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {name} failed"
