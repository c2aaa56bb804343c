"""Pretrain once, reuse everywhere: the pretrained LM as a unit that leaves the project and
comes back into another (docs/pretrained.md).

A reusable LM is a folder, what the ``pretrain`` stage writes: ``model.pt`` (a model file of
kind ``lm``, ``ulmfit.checkpoint``) and the ``tokenizer.model`` it was trained with, plus its
``training.json`` when known. The LM cannot be used without that tokenizer (the same ids must
mean the same pieces), so the two always travel together.

- :func:`register_lm_task`: the ``pretrain`` stage registers its LM as a new version of
  ``<mlflow.model_name_prefix>-lm-<direction>`` (an MLflow 3 logged model holding the folder's
  files as plain artifacts, with tags for its direction, vocabulary, tokenizer sha256, tokens
  seen, validation perplexity and pipeline id).
- :func:`fetch_lm_task`: ``pretrain.reuse.<direction>`` (a local folder or file, a URL of an
  archive with its sha256, or a ``models:/`` URI of any MLflow store) -> a checked local
  folder. :func:`check_lm` refuses an LM whose tokenizer is not the one beside it, or whose
  embedding does not match that tokenizer's vocabulary; :func:`check_architecture` one whose
  sizes are not ``pretrain.model``'s; :func:`one_tokenizer` LMs of several tokenizers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from tasks import tracking
from tasks.params import PretrainedSource
from tasks.tokens import TOKENIZER_FILE
from tasks.training import MODEL_FILE, TRAINING_FILE
from ulmfit.checkpoint import load_model
from ulmfit.config import to_dict
from ulmfit.corpora.archive import ExtractLimits, is_archive
from ulmfit.corpora.download import ConsoleProgress
from ulmfit.corpora.output import staged_directory
from ulmfit.corpora.sources import InputLog, fetch, unpack
from ulmfit.errors import InputError
from ulmfit.io import sha256_file
from ulmfit.model import AWDLSTMConfig
from ulmfit.tokenizer import Tokenizer
from ulmfit.transformer import TransformerConfig

LM_FILES = (MODEL_FILE, TOKENIZER_FILE, TRAINING_FILE)
SOURCES_FILE = "sources.json"
_MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w.-]+))")


def lm_model_name(prefix: str, direction: str) -> str:
    return f"{prefix}-lm-{direction}"


@dataclasses.dataclass(frozen=True)
class ImportedLM:
    """A reused LM on local disk, checked: its folder, where it came from and what it is."""

    folder: Path  # holds model.pt and tokenizer.model
    origin: str  # the path, URL or models:/ URI of params.yaml
    sha256: str  # of what was fetched: the archive of a URL, else model.pt
    model_sha256: str
    tokenizer_sha256: str
    vocab_size: int
    config: Mapping  # the LM's AWDLSTMConfig as a dict
    details: Mapping  # MLflow: the model version and run it came from

    def record(self) -> dict:
        """What the stages record (sources.json, metrics, MLflow params)."""
        return {
            "origin": self.origin,
            "sha256": self.sha256,
            "model_sha256": self.model_sha256,
            "tokenizer_sha256": self.tokenizer_sha256,
            "vocab_size": self.vocab_size,
            **self.details,
        }


# ---------------------------------------------------------------------------- registration


@task(name="register-language-model", cache_policy=NONE, persist_result=False)
def register_lm_task(
    *,
    root: Path,
    run_id: str,
    experiment: str,
    lm_dir: Path,
    name: str,
    direction: str,
    metrics: Mapping[str, float],
    backbone: str = "awd_lstm",
) -> dict:
    """``lm_dir``'s files as the artifacts of an MLflow logged model of the stage's run,
    registered as a new version of ``name`` and tagged with its ``backbone``
    (``pretrain.model.backbone``); returns ``{"name", "version", "uri"}``."""
    from mlflow.exceptions import MlflowException

    client = tracking.client(root)
    tracking.use_store(root)  # the registry finds the logged model through the global store
    tokenizer = Tokenizer.load(lm_dir / TOKENIZER_FILE)
    perplexity = metrics.get("valid_perplexity")
    tags = {
        "ulmfit.direction": direction,
        "ulmfit.backbone": backbone,
        "ulmfit.vocab_size": str(tokenizer.vocab_size),
        "ulmfit.tokenizer_sha256": tokenizer.identity,
        "ulmfit.tokens_seen": str(int(metrics.get("tokens_trained", 0))),
        "ulmfit.valid_perplexity": "" if perplexity is None else repr(float(perplexity)),
        "ulmfit.pipeline_id": tracking.pipeline_id(root),
        "ulmfit.stage_run_id": run_id,
    }
    model = client.create_logged_model(
        tracking.experiment_id(root, experiment),
        name=f"lm-{direction}",
        source_run_id=run_id,
        tags=tags,
        model_type="ulmfit-lm",
    )
    for file in LM_FILES:
        if (lm_dir / file).is_file():
            client.log_model_artifact(model.model_id, str(lm_dir / file))
    client.finalize_logged_model(model.model_id, "READY")
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        name, source=f"models:/{model.model_id}", run_id=run_id, tags=tags, model_id=model.model_id
    )
    return {
        "name": name,
        "version": str(version.version),
        "uri": f"models:/{name}/{version.version}",
    }


# ------------------------------------------------------------------------------------ reuse


# Not retried by Prefect: a download resumes and retries by itself (ulmfit.corpora.download).
@task(name="fetch-pretrained-lm", cache_policy=NONE, persist_result=False)
def fetch_lm_task(
    root: Path, source: PretrainedSource, direction: str, cache_dir: Path
) -> ImportedLM:
    """``pretrain.reuse.<direction>`` -> the LM's checked local folder (:func:`check_lm`)."""
    where = f"pretrain.reuse.{direction}"
    if source.model_uri:
        folder, details = _download_registered(root, source, cache_dir, where)
        return check_lm(folder, source.model_uri, sha256_file(folder / MODEL_FILE), details)
    origin = source.path or source.url or ""
    value = str(Path(root) / source.path) if source.path else origin
    progress = ConsoleProgress()
    try:
        local = fetch(
            value,
            cache_dir,
            sha256=source.sha256,
            progress=progress,
            role=f"pretrained {direction}",
            log=InputLog(),
        )
    finally:
        progress.close()
    sha256 = sha256_file(local) if local.is_file() else None
    if local.is_file() and local.suffix in (".pt", ".pth"):
        folder = local.parent  # a model file: its tokenizer lies beside it
    elif local.is_file() and is_archive(local):
        folder = _lm_folder(unpack(local, cache_dir, ExtractLimits()), origin)
    elif local.is_dir():
        folder = _lm_folder(local, origin)
    else:
        raise InputError(
            origin,
            "not an LM folder, model file or archive",
            fix=f"point {where} at what the pretrain stage writes (data/pretrained/<direction>/), "
            "or a .tar.gz of that folder",
        )
    return check_lm(folder, origin, sha256 or sha256_file(folder / MODEL_FILE), {})


def _lm_folder(root: Path, origin: str) -> Path:
    """The folder holding ``model.pt`` in ``root`` (itself, or the one shallowest inside)."""
    if (root / MODEL_FILE).is_file():
        return root
    found = sorted((p.parent for p in root.rglob(MODEL_FILE)), key=lambda p: len(p.parts))
    if not found or (len(found) > 1 and len(found[1].parts) == len(found[0].parts)):
        what = "no" if not found else "more than one"
        raise InputError(
            origin,
            f"{what} {MODEL_FILE} inside",
            fix="pack one pretrain output folder (model.pt and tokenizer.model) per LM",
        )
    return found[0]


def _download_registered(
    root: Path, source: PretrainedSource, cache_dir: Path, where: str
) -> tuple[Path, dict]:
    """A registered LM version's files, downloaded once per (store, name, version)."""
    import mlflow.artifacts
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = source.tracking_uri or tracking.tracking_uri(root)
    match = _MODEL_URI.fullmatch(source.model_uri or "")
    if match is None:
        raise InputError(
            source.model_uri or "",
            "not a registered model URI",
            fix=f"write {where}.model_uri as models:/<name>/<version> or models:/<name>@<alias>",
        )
    name = match["name"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        if match["version"]:
            version = client.get_model_version(name, match["version"])
        elif match["alias"] == "latest":  # MLflow's own alias: the newest version
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise MlflowException(f"registered model '{name}' has no version")
            version = max(versions, key=lambda v: int(v.version))
        else:
            version = client.get_model_version_by_alias(name, match["alias"])
    except MlflowException as error:
        raise InputError(
            source.model_uri or "",
            f"not found in the MLflow store {uri} ({error.message})",
            fix=f"check the name, version or alias (mlflow ui) and {where}.tracking_uri",
        ) from error
    key = hashlib.sha256(f"{uri}\n{name}\n{version.version}".encode()).hexdigest()[:12]
    folder = cache_dir / "pretrained" / f"{name}-v{version.version}-{key}"
    if not (folder / MODEL_FILE).is_file():
        # Where the version's files are, asked of this store: resolving a models:/ URI itself,
        # MLflow would ask the process-wide registry, which may be another project's.
        location = client.get_model_version_download_uri(name, version.version)
        with staged_directory(folder) as staging:
            mlflow.artifacts.download_artifacts(
                artifact_uri=location, dst_path=str(staging), tracking_uri=uri
            )
    details = {
        "tracking_uri": uri,
        "model_name": name,
        "model_version": str(version.version),
        "model_run_id": version.run_id or "",
    }
    return _lm_folder(folder, source.model_uri or ""), details


def check_lm(folder: Path, origin: str, sha256: str, details: Mapping) -> ImportedLM:
    """The LM in ``folder``, refused unless it is an LM, trained with the ``tokenizer.model``
    beside it, and its embedding has one row per piece of that tokenizer."""
    model_file, tokenizer_file = folder / MODEL_FILE, folder / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise InputError(
            tokenizer_file,
            "a pretrained LM without its tokenizer",
            fix="reuse the whole pretrain output folder (model.pt and tokenizer.model)",
        )
    tokenizer = Tokenizer.load(tokenizer_file)
    model, meta = load_model(model_file)
    if meta["kind"] != "lm":
        raise InputError(model_file, f"a {meta['kind']}, not a language model", fix=_FIX_ORIGIN)
    if meta["tokenizer_identity"] != tokenizer.identity:
        raise InputError(
            model_file,
            f"the LM was trained with another tokenizer (sha256 {meta['tokenizer_identity']}) "
            f"than the tokenizer.model beside it (sha256 {tokenizer.identity})",
            fix="put the LM's own tokenizer.model beside it",
        )
    vocab = int(meta["config"]["vocab_size"])
    if vocab != tokenizer.vocab_size:
        raise InputError(
            model_file,
            f"the LM's embedding has {vocab} rows but its tokenizer has "
            f"{tokenizer.vocab_size} pieces",
            fix=_FIX_ORIGIN,
        )
    return ImportedLM(
        folder=folder,
        origin=origin,
        sha256=sha256,
        model_sha256=sha256_file(model_file),
        tokenizer_sha256=tokenizer.identity,
        vocab_size=vocab,
        config=to_dict(model.cfg),  # as parsed: fields added since it was saved at defaults
        details=dict(details),
    )


_FIX_ORIGIN = "point pretrain.reuse at a language model written by the pretrain stage"


def check_architecture(
    lm: ImportedLM, model: AWDLSTMConfig | TransformerConfig, direction: str
) -> None:
    """The LM's backbone and sizes must be ``pretrain.model``'s: fine-tuning and the classifier
    build their encoder from those."""
    sizes = {
        name: value
        for name, value in to_dict(model).items()
        if not name.endswith("dropout") and name not in ("vocab_size", "mask_rate")
    }
    differ = {k: (lm.config.get(k), v) for k, v in sizes.items() if lm.config.get(k) != v}
    if differ:
        text = ", ".join(f"{k} {theirs} (params: {ours})" for k, (theirs, ours) in differ.items())
        raise InputError(
            lm.folder / MODEL_FILE,
            f"the reused {direction} LM has {text}",
            fix="set pretrain.model to the reused LM's sizes",
        )


def one_tokenizer(lms: Mapping[str, ImportedLM]) -> ImportedLM:
    """The LM whose tokenizer the project takes (fwd first); every LM must share it."""
    first = next(iter(lms.values()))
    for lm in lms.values():
        if lm.tokenizer_sha256 != first.tokenizer_sha256:
            raise InputError(
                "params.yaml",
                f"pretrain.reuse: the LMs come with different tokenizers "
                f"({', '.join(f'{d} sha256 {x.tokenizer_sha256}' for d, x in lms.items())})",
                fix="reuse a forward and a backward LM pretrained with one tokenizer",
            )
    return first


def check_workspace_tokenizer(lm: ImportedLM, workspace: Tokenizer, direction: str) -> None:
    """The reused LM's tokenizer must be the workspace's (what tokenized the datasets)."""
    if lm.tokenizer_sha256 != workspace.identity:
        raise InputError(
            lm.folder / MODEL_FILE,
            f"the reused {direction} LM's tokenizer (sha256 {lm.tokenizer_sha256}) is not "
            f"the workspace's {workspace.path} (sha256 {workspace.identity})",
            fix="dvc repro train_tokenizer (it takes the reused LMs' tokenizer)",
        )


@task(name="place-tokenizer", cache_policy=NONE, persist_result=False)
def place_tokenizer_task(lm: ImportedLM, out_dir: Path) -> dict:
    """The reused LMs' tokenizer as the project's (``train_tokenizer``'s output)."""
    with staged_directory(out_dir) as staging:
        shutil.copy2(lm.folder / TOKENIZER_FILE, staging / TOKENIZER_FILE)
        _write_sources(staging, lm)
    return {"vocab_size": lm.vocab_size, "tokenizer_identity": lm.tokenizer_sha256}


@task(name="place-pretrained-lm", cache_policy=NONE, persist_result=False)
def place_lm_task(lm: ImportedLM, out_dir: Path) -> dict:
    """The reused LM as the ``pretrain`` stage's output (its files, snapshots included, and
    ``sources.json``); returns its metrics: the origin and what its training recorded."""
    with staged_directory(out_dir) as staging:
        for name in (*LM_FILES, "snapshots"):
            path = lm.folder / name
            if path.is_dir():
                shutil.copytree(path, staging / name)
            elif path.is_file():
                shutil.copy2(path, staging / name)
        _write_sources(staging, lm)
    trained = {}
    if (lm.folder / TRAINING_FILE).is_file():
        trained = json.loads((lm.folder / TRAINING_FILE).read_text(encoding="utf-8"))
    metrics = {
        f"valid_{k}": v
        for k, v in (trained.get("metrics") or {}).items()
        if isinstance(v, int | float)
    }
    for key in ("tokens_trained", "train_tokens", "train_documents"):
        if isinstance(trained.get(key), int | float):
            metrics[key] = trained[key]
    return {**metrics, "reused": lm.record()}


def _write_sources(folder: Path, lm: ImportedLM) -> None:
    (folder / SOURCES_FILE).write_text(json.dumps([lm.record()], indent=2) + "\n")


def log_origin(root: Path, run_id: str, lm: ImportedLM, prefix: str) -> None:
    """The origin and its checksums as MLflow params of the stage's run."""
    from mlflow.entities import Param

    params = [Param(f"{prefix}.{k}"[:250], str(v)[:6000]) for k, v in lm.record().items()]
    tracking.client(root).log_batch(run_id, params=params)
