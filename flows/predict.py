"""``ulmfit predict``: classify the texts of a CSV with a registered MLflow model or a local
model directory (both the forward/backward ensemble of paper section 3.3)."""

from __future__ import annotations

from pathlib import Path

from ulmfit.errors import InputError
from ulmfit.io import atomic_path


def load_predictor(root: Path, model: str):
    """A callable ``DataFrame -> DataFrame`` for ``models:/...`` URIs (through MLflow's pyfunc
    loader, exactly what ``mlflow models serve`` runs) or a ``TextClassifier`` directory."""
    if model.startswith(("models:/", "runs:/")):
        import mlflow

        from tasks import tracking

        tracking.use_store(root)
        try:
            pyfunc = mlflow.pyfunc.load_model(model)
        except mlflow.exceptions.MlflowException as error:
            raise InputError(
                model,
                f"cannot load the model ({error.message})",
                fix="check the name and alias with 'mlflow ui' or run 'ulmfit repro' "
                "to register one; MLFLOW_TRACKING_URI picks another store",
            ) from error
        return pyfunc.predict
    directory = Path(model)
    from tasks.pyfunc_model import TextClassifierModel
    from ulmfit.predict import TextClassifier

    wrapper = TextClassifierModel()
    wrapper.classifier = TextClassifier.load(directory)
    return lambda frame, params=None: wrapper.predict(None, frame, params)


def predict_csv(
    root: Path,
    model: str,
    input_path: Path,
    output_path: Path,
    *,
    text_column: str = "text",
    batch_size: int = 64,
) -> Path:
    """Read ``input_path``, add ``label``/``probability``/``prob_<label>`` columns, write
    ``output_path`` atomically."""
    import pandas as pd

    if not input_path.is_file():
        raise InputError(input_path, "input CSV not found", fix="pass an existing --input file")
    try:
        frame = pd.read_csv(input_path)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as error:
        raise InputError(
            input_path,
            f"not a readable CSV ({error})",
            fix="pass a UTF-8 CSV file with a header row",
        ) from error
    if text_column not in frame.columns:
        raise InputError(
            input_path,
            f"no column '{text_column}' (columns: {list(frame.columns)})",
            fix="name the text column with --text-column",
        )
    predictor = load_predictor(root, model)
    predictions = predictor(
        pd.DataFrame({"text": frame[text_column].fillna("").astype(str)}),
        params={"batch_size": batch_size},
    )
    result = pd.concat([frame.reset_index(drop=True), predictions.reset_index(drop=True)], axis=1)
    with atomic_path(output_path) as tmp:
        result.to_csv(tmp, index=False)
    return output_path
