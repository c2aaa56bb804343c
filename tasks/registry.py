"""The MLflow model registry: each dataset's trained classifier (forward + backward ensemble)
becomes a new version of the registered model ``<mlflow.model_name_prefix>-<dataset>``.

- Every version carries tags ``ulmfit.dataset``, ``ulmfit.pipeline_id``, ``ulmfit.stage_run_id``
  and ``ulmfit.test_error`` (ensemble test error, a fraction): what the retrain flow
  compares with the champion's.
- ``models:/<name>@latest`` is MLflow's built-in (it resolves to the newest version; MLflow
  reserves the alias name, so none is set). The ``champion`` alias is the retrain flow's to move
  (it promotes only a better model); the first version becomes champion when there is none.
- The model is a pyfunc "model from code" (``tasks/pyfunc_model.py``): raw text in (a DataFrame
  with a ``text`` column), ``label``, ``probability`` and ``prob_<label>`` out.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from prefect import task
from prefect.cache_policies import NONE

from tasks import tracking
from tasks.lifeline import stop_signals_held

CHAMPION = "champion"
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")


def model_name(prefix: str, dataset: str) -> str:
    return f"{prefix}-{dataset}"


@task(name="register-classifier", cache_policy=NONE, persist_result=False)
def register_classifier_task(
    *,
    root: Path,
    run_id: str,
    model_dir: Path,
    name: str,
    dataset: str,
    metrics: Mapping[str, float],
    examples: list[str],
) -> dict:
    """Log ``model_dir`` as a pyfunc model in the stage's run and register it, tagged with the
    backbone it holds (``ulmfit.backbone``); returns ``{"name", "version", "uri", "champion",
    "backbone"}``."""
    import mlflow
    import pandas as pd
    import sentencepiece
    import torch
    from mlflow.models import infer_signature

    from ulmfit.predict import TextClassifier

    client = tracking.client(root)
    tracking.use_store(root)
    sample = pd.DataFrame({"text": examples[:3]})
    classifier = TextClassifier.load(model_dir)
    labels, probs = classifier.predict(sample["text"].tolist())
    output = pd.DataFrame({"label": labels, "probability": probs.max(axis=1)})
    for index, label in enumerate(classifier.label_names):
        output[f"prob_{label}"] = probs[:, index]
    requirements = [
        f"mlflow=={mlflow.__version__}",
        f"torch=={torch.__version__.split('+')[0]}",
        f"sentencepiece=={sentencepiece.__version__}",
        "numpy",
        "pandas",
        "pyarrow",
    ]
    with stop_signals_held(), mlflow.start_run(run_id=run_id):  # as tracking.client's calls
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_FILE),
            artifacts={"classifier": str(model_dir)},
            code_paths=[str(Path(root) / "ulmfit")],
            signature=infer_signature(sample, output),
            pip_requirements=requirements,
            registered_model_name=name,
        )
    version = str(info.registered_model_version)
    error = metrics.get("test_error_ensemble")
    tags = {
        "ulmfit.dataset": dataset,
        "ulmfit.backbone": classifier.backbone,
        "ulmfit.pipeline_id": tracking.pipeline_id(root),
        "ulmfit.stage_run_id": run_id,
        "ulmfit.test_error": "" if error is None else repr(float(error)),
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    aliases = client.get_registered_model(name).aliases or {}
    champion = aliases.get(CHAMPION)
    if champion is None:
        client.set_registered_model_alias(name, CHAMPION, version)
        champion = version
    return {
        "name": name,
        "version": version,
        "uri": f"models:/{name}/{version}",
        "champion": str(champion),
        "backbone": classifier.backbone,
    }
