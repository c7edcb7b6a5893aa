"""Every architecture the registry claims has a Hugging Face parity test, and the README table
printer (`python -m octavo.models.registry --markdown`) covers the registry, and README.md's
table is exactly what it prints.

A parity module names what it tests in a module-level ARCHITECTURES list; for a module without
one, the registered names that occur as string literals in its source are taken instead.
"""
from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys

from tiny_models import TINY_ARCHS
from octavo.models.registry import EXAMPLE_MODELS, markdown_table, supported_architectures

HERE = os.path.dirname(__file__)
README = os.path.join(HERE, "..", "..", "README.md")
# test_hf_parity.py parametrizes over conftest.TINY_ARCHS
PARITY_MODULES = ["test_parity_dense_a", "test_parity_dense_b", "test_parity_remote",
                  "test_parity_remote_mla", "test_parity_moe", "test_parity_remote_internlm",
                  "test_parity_remote_iquest", "test_parity_deepseek",
                  "test_parity_longcat", "test_parity_remote_arctic", "test_mamba_parity",
                  "test_zamba2_parity", "test_kimi_linear_parity"]


def _string_literals(path: str) -> set[str]:
    with open(path) as f:
        tree = ast.parse(f.read())
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def _tested_by(module_name: str) -> set[str]:
    path = os.path.join(HERE, f"{module_name}.py")
    assert os.path.isfile(path), f"parity module {path} is missing"
    listed = getattr(importlib.import_module(module_name), "ARCHITECTURES", None)
    if listed is not None:
        return set(listed)
    return _string_literals(path) & set(supported_architectures())


def test_every_registered_architecture_has_a_parity_test():
    tested = set(TINY_ARCHS).union(*(_tested_by(m) for m in PARITY_MODULES))
    untested = sorted(set(supported_architectures()) - tested)
    assert not untested, f"registered without a Hugging Face parity test: {untested}"


def test_parity_modules_list_only_registered_architectures():
    for module_name in PARITY_MODULES:
        unknown = _tested_by(module_name) - set(supported_architectures())
        assert not unknown, f"{module_name} tests unregistered architectures {sorted(unknown)}"


def test_markdown_table_lists_the_registry():
    out = subprocess.run([sys.executable, "-m", "octavo.models.registry", "--markdown"],
                         capture_output=True, text=True, check=True).stdout
    rows = re.findall(r"^\| `(\w+)` \| (.+) \|$", out, flags=re.M)
    assert sorted(name for name, _ in rows) == supported_architectures()
    missing = [name for name, examples in rows if not examples.strip()]
    assert not missing, f"no example models in EXAMPLE_MODELS for {missing}"
    assert set(EXAMPLE_MODELS) >= set(supported_architectures())


def test_readme_table_is_the_registry_table():
    with open(README) as f:
        section = f.read().partition("Supported architectures")[2].partition("\n## ")[0]
    table = "\n".join(line for line in section.splitlines() if line.startswith("|"))
    assert table == markdown_table(), ("README.md's supported-architectures table differs from "
                                       "the registry: paste `python -m octavo.models.registry "
                                       "--markdown` into it")
