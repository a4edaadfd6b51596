"""The import layers in pyproject.toml hold, and no graftnet module imports itself in a circle.

Both count imports inside functions: a lazy import hides a cycle from Python at start-up, not from
the code's structure.
"""
from __future__ import annotations

import grimp
import pytest
from importlinter import configuration
from importlinter.application.use_cases import lint_imports

from .conftest import ROOT


@pytest.fixture(scope="module")
def graph():
    return grimp.build_graph("graftnet")


def test_layers_contract_holds(monkeypatch):
    monkeypatch.chdir(ROOT)
    configuration.configure()  # what the `lint-imports` command does first: its file readers
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), cache_dir=None, no_logo=True), \
        "a contract in pyproject.toml [tool.importlinter] is broken: see the report above"


def test_no_import_cycles(graph):
    cycles = sorted(f"{a} -> {b} -> ... -> {a}"
                    for a in graph.modules for b in graph.find_modules_directly_imported_by(a)
                    if graph.chain_exists(importer=b, imported=a))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("registry", ["graftnet.train.optim", "graftnet.data.augment"])
def test_registries_that_config_reads_import_only_leaves(graph, registry):
    """The contract lets config import these two (their names are its allowed values); that is
    only sound while they import nothing of graftnet that sits above config."""
    assert graph.find_upstream_modules(registry) <= {"graftnet.registry", "graftnet.errors"}
