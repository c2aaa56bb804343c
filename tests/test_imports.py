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
