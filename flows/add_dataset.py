"""``ulmfit add-dataset``: a user's labelled file or folder becomes a dataset of ``params.yaml``.

It reads the data exactly as the prepare stage will (``prepare_dataset`` into a scratch
folder), so a misspelt column, an empty text or a class too small to split is refused here,
before any stage runs, and ``params.yaml`` is left untouched. Then it writes the section
``datasets.<name>.source`` with a YAML round trip that keeps the file's comments (ruamel.yaml,
the YAML library DVC itself uses), validates the result, and replaces ``params.yaml``
atomically.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from tasks.params import load_params
from tasks.workspace import Layout
from ulmfit.config import from_dict
from ulmfit.corpora import DatasetSource, prepare_dataset
from ulmfit.errors import InputError
from ulmfit.io import atomic_write

# Dataset names become DVC stage items (``finetune_lm@<name>-fwd``, where ``-`` separates the
# direction) and MLflow model names (``ulmfit-<name>``).
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Added:
    name: str
    source: dict
    summary: dict
    removed: tuple[str, ...]  # datasets and controls dropped by ``only``


def dataset_name(path: Path) -> str:
    """A dataset name from a file or folder name: ``My Tickets.csv`` -> ``my_tickets``."""
    stem = path.name.split(".")[0] if path.is_file() else path.name
    name = re.sub(r"[^A-Za-z0-9_]+", "_", stem).strip("_").lower()
    return name if NAME.fullmatch(name) else f"data_{name}".rstrip("_")


def _relative(root: Path, path: Path) -> str:
    """``path`` as ``params.yaml`` should hold it: relative to the project when inside it."""
    path = path.resolve()
    try:
        return path.relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path)


def source_entry(
    root: Path,
    path: Path,
    *,
    text_columns: list[str],
    label_column: str | None,
    test_path: Path | None = None,
    unsup_path: Path | None = None,
) -> dict:
    """The ``datasets.<name>.source`` mapping for a table file or a folder of class folders."""
    if not path.exists():
        raise InputError(path, "no such file or folder", fix="pass an existing data file or folder")
    if path.is_dir():
        entry: dict = {"layout": "folder", "path": _relative(root, path)}
    else:
        if not label_column or not text_columns:
            raise InputError(
                path,
                "a table needs its label column and its text column(s)",
                fix="pass --label <column> and --text <column> (repeat --text to join several)",
            )
        entry = {
            "layout": "table",
            "path": _relative(root, path),
            "text_columns": list(text_columns),
            "label_column": label_column,
        }
    if test_path is not None:
        entry["test_path"] = _relative(root, test_path)
    if unsup_path is not None:
        entry["unsup_path"] = _relative(root, unsup_path)
    return entry


def check_source(root: Path, name: str, entry: dict) -> dict:
    """Prepare the dataset into a scratch folder, as the prepare stage will (which runs in the
    project root, hence the paths made absolute here); its summary."""
    paths = {key: str(root / value) for key, value in entry.items() if key.endswith("path")}
    source = from_dict(
        DatasetSource, {"name": name, **entry, **paths}, where=f"datasets.{name}.source"
    )
    with tempfile.TemporaryDirectory(prefix="ulmfit-add-") as scratch:
        return prepare_dataset(
            source,
            Path(scratch) / "prepared",
            cache_dir=root / Layout.cache_dir,
            progress=lambda *args: None,
        )


def _round_trip() -> YAML:
    """ruamel.yaml set to change nothing it was not asked to: no line wrapping, quotes and
    ``null`` kept as written."""
    yaml = YAML()
    yaml.width = 4096
    yaml.preserve_quotes = True
    yaml.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    return yaml


def _commented(value):
    """``value`` as ruamel's commentable nodes, lists in flow style as the file writes them."""
    if isinstance(value, dict):
        return CommentedMap((key, _commented(item)) for key, item in value.items())
    if isinstance(value, list):
        seq = CommentedSeq(value)
        seq.fa.set_flow_style()
        return seq
    return value


def _last_key(node) -> tuple[CommentedMap | None, str | None]:
    """The mapping and key of the last line of ``node``: ruamel keeps the comment lines that
    follow a block (the next section's heading) on that key."""
    while isinstance(node, CommentedMap) and node:
        key = next(reversed(node))
        if not (isinstance(node[key], CommentedMap) and node[key]):
            return node, key
        node = node[key]
    return None, None


def write_params(root: Path, name: str, entry: dict, *, only: bool) -> tuple[str, ...]:
    """Put ``entry`` at ``datasets.<name>.source`` (with ``only``: as the only dataset, dropping
    the controls of the others); validate; replace ``params.yaml``. Returns what was dropped."""
    params = root / "params.yaml"
    yaml = _round_trip()
    data = yaml.load(params.read_text(encoding="utf-8"))
    datasets = data.setdefault("datasets", CommentedMap())
    # The comment after the datasets section (the next section's heading) moves to its new end.
    holder, key = _last_key(datasets)
    trailing = holder.ca.items.pop(key, None) if holder is not None else None
    removed: list[str] = []
    if only:
        for other in [key for key in datasets if key != name]:
            del datasets[other]
            removed.append(f"datasets.{other}")
        controls = data.get("controls") or {}
        for control in [key for key, value in controls.items() if value.get("dataset") != name]:
            del controls[control]
            removed.append(f"controls.{control}")
    existing = datasets.get(name) or CommentedMap()
    existing["source"] = _commented(entry)
    datasets[name] = existing
    holder, key = _last_key(datasets)
    if trailing is not None and holder is not None:
        holder.ca.items[key] = trailing
    text = StringIO()
    yaml.dump(data, text)
    with tempfile.TemporaryDirectory(prefix="ulmfit-params-") as scratch:
        candidate = Path(scratch) / "params.yaml"
        candidate.write_text(text.getvalue(), encoding="utf-8")
        load_params(candidate, root=root)  # refuse to write a params.yaml that does not load
    with atomic_write(params, "w") as handle:
        handle.write(text.getvalue())
    return tuple(removed)


def add_dataset(
    root: Path,
    path: Path,
    *,
    name: str | None = None,
    text_columns: list[str] | None = None,
    label_column: str | None = None,
    test_path: Path | None = None,
    unsup_path: Path | None = None,
    only: bool = False,
    check: bool = True,
) -> Added:
    """Check the data, then add it to ``params.yaml`` as dataset ``name``."""
    name = name or dataset_name(path)
    if not NAME.fullmatch(name):
        raise InputError(
            root / "params.yaml",
            f"dataset name {name!r} is not a letter followed by letters, digits or '_'",
            fix="pass --name with such a name (it becomes stage and MLflow model names)",
        )
    entry = source_entry(
        root,
        path,
        text_columns=list(text_columns or ()),
        label_column=label_column,
        test_path=test_path,
        unsup_path=unsup_path,
    )
    summary = check_source(root, name, entry) if check else {}
    removed = write_params(root, name, entry, only=only)
    return Added(name, entry, summary, removed)


def describe(added: Added) -> str:
    """What ``ulmfit add-dataset`` prints: the classes found, the splits, the next command."""
    lines = [f"params.yaml: datasets.{added.name}.source = {added.source}"]
    if added.summary:
        splits = added.summary["splits"]
        train = splits["train"]["per_class"]
        lines.append(
            f"{len(added.summary['label_names'])} classes, in this order: "
            + ", ".join(f"{label} ({train.get(label, 0)} train)" for label in train)
        )
        lines.append(
            "splits: " + ", ".join(f"{split} {info['count']}" for split, info in splits.items())
        )
        lines.extend(f"note: {note}" for note in added.summary.get("notes", ()))
    if added.removed:
        lines.append("removed: " + ", ".join(added.removed))
    lines.append(
        f"next: ulmfit repro, then ulmfit predict --model models:/ulmfit-{added.name}@champion "
        "--input <file> --output <file>"
    )
    return "\n".join(lines)
