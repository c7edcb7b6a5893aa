"""README's first screen is two commands (install + run, install + test), and CI runs the
test command word for word."""
from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _first_block() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_opens_with_two_commands():
    run, test = _first_block()
    assert run.startswith("pip install . && octavo generate ")
    assert test == 'pip install -e ".[test]" && pytest'


def test_ci_runs_the_readme_test_command():
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        lines = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    assert _first_block()[1] in lines


def test_docs_name_no_file_outside_the_repository():
    # the project's docs must stand alone: no paths into a developer's machine or shared notes
    outside = re.compile(r"\.\./shared|/work/|DESIGN\.md|STYLE\.md|CPU-NOTES")
    for folder, _, files in os.walk(ROOT):
        if any(part in folder for part in (".git", "build", "node_modules", ".egg-info")):
            continue
        for name in files:
            if name.endswith(".md") or name in ("setup.py",):
                with open(os.path.join(folder, name), errors="replace") as f:
                    hits = outside.findall(f.read())
                assert not hits, f"{os.path.join(folder, name)} mentions {hits}"
