"""The examples in the API docs run as written (model and graph building)."""
from __future__ import annotations

import doctest
import importlib

import pytest

from _backends import one_torch_thread  # noqa: F401 (autouse fixture)


@pytest.mark.parametrize("module", ["hgc.nn.model", "hgc.graph.edges"])
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
