"""The examples in docstrings are executable documentation: they must stay true."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "learners.actr", "learners.rewards.composite", "learners.rewards.rules", "learners.rewards.judge",
    "learners.tasks", "learners.tao", "streams.store", "streams.scoring", "serving.router", "serving.backends",
    "taoflow.report", "serving.dashboard", "serving.sessions", "streams.sessions", "serving.upstream", "streams.sqlapi",
    "taoflow.restart", "learners.gate", "learners.candidates", "learners.lineage",
]  # fmt: skip


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
