"""``ulmfit profile``: named parameter sets in ``profiles/``; one is copied to ``params.yaml``.

``params.yaml`` stays the one source of parameters (DVC tracks it, ``dvc exp run -S`` edits
it); a profile is only a starting point, validated before it replaces the current file.
"""

from __future__ import annotations

from pathlib import Path

from tasks.params import load_params
from ulmfit.errors import InputError
from ulmfit.io import atomic_write


def list_profiles(root: Path) -> list[tuple[str, str]]:
    """``(name, first comment line)`` of each ``profiles/*.yaml``."""
    out = []
    for path in sorted((root / "profiles").glob("*.yaml")):
        first = path.read_text(encoding="utf-8").splitlines()[:1]
        summary = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        out.append((path.stem, summary))
    return out


def use_profile(root: Path, name: str) -> Path:
    """Validate ``profiles/<name>.yaml`` and copy it over ``params.yaml``."""
    path = root / "profiles" / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(n for n, _ in list_profiles(root)) or "none"
        raise InputError(path, "no such profile", fix=f"pick one of: {names}")
    # Refuse a broken profile before touching params.yaml; its data paths are checked when the
    # pipeline runs (a profile may be picked before its data are in place).
    load_params(path, root=root, check_paths=False)
    with atomic_write(root / "params.yaml", "w") as handle:
        handle.write(path.read_text(encoding="utf-8"))
    return path
