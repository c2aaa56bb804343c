"""The library stands alone: importing every ``ulmfit`` module loads no pipeline tool."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import ulmfit


def test_library_imports_no_pipeline_tools():
    modules = sorted(m.name for m in pkgutil.walk_packages(ulmfit.__path__, prefix="ulmfit."))
    assert "ulmfit.errors" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in ('prefect', 'mlflow', 'dvc') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "", f"importing ulmfit loaded pipeline tools: {out}"


def test_tasks_never_import_flows():
    """Imports point one way, ``flows/ -> tasks/ -> ulmfit/``: a flow calls tasks, and no task
    reaches back into a flow (helpers two flows share belong in ``tasks/``)."""
    import ast
    from pathlib import Path

    tasks = Path(__file__).resolve().parents[1] / "tasks"
    for path in sorted(tasks.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            assert not [n for n in names if n.split(".")[0] == "flows"], (path.name, names)


def test_flows_import_no_other_flow():
    """Each flow module stands on tasks alone (the CLI, which imports flows by name, aside)."""
    import ast
    from pathlib import Path

    flows = Path(__file__).resolve().parents[1] / "flows"
    for path in sorted(flows.glob("*.py")):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert node.module.split(".")[0] != "flows", (path.name, node.module)
