"""``ulmfit predict``: classify the texts of a CSV, TSV, JSON Lines or Parquet file with a
registered MLflow model or a local model directory (both the forward/backward ensemble of paper
section 3.3)."""

from __future__ import annotations

from pathlib import Path

from ulmfit.corpora.tables import table_format
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


def read_rows(path: Path, fmt: str):
    """A DataFrame of every column of a CSV, TSV, JSON Lines, JSON or Parquet file (columns as
    they are: CSV fields stay text, so ``007`` is not turned into 7)."""
    import pandas as pd
    import pyarrow

    readers = {
        "csv": lambda: pd.read_csv(path, dtype=str, keep_default_na=False),
        "tsv": lambda: pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False),
        "jsonl": lambda: pd.read_json(path, lines=True, dtype=False),
        "json": lambda: pd.read_json(path, dtype=False),
        "parquet": lambda: pd.read_parquet(path),
    }
    try:
        return readers[fmt]()
    except (ValueError, UnicodeDecodeError, pyarrow.ArrowException) as error:
        # pandas' ParserError and EmptyDataError are ValueErrors
        raise InputError(
            path,
            f"not a readable {fmt} file ({str(error).splitlines()[0]})",
            fix=f"pass a UTF-8 {fmt} file with a header row"
            if fmt in ("csv", "tsv")
            else f"pass a {fmt} file, or name the format with the file extension",
        ) from error


def write_rows(frame, path: Path, fmt: str) -> None:
    """Write ``frame`` to ``path`` atomically in ``fmt`` (gzip, bz2 or xz by the suffix)."""
    compression = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz"}.get(path.suffix.lower())
    with atomic_path(path) as tmp:
        if fmt == "parquet":
            frame.to_parquet(tmp, index=False)
        elif fmt in ("jsonl", "json"):
            frame.to_json(
                tmp,
                orient="records",
                lines=fmt == "jsonl",
                force_ascii=False,
                compression=compression,
            )
        else:
            frame.to_csv(
                tmp, index=False, sep="\t" if fmt == "tsv" else ",", compression=compression
            )


def predict_file(
    root: Path,
    model: str,
    input_path: Path,
    output_path: Path,
    *,
    text_column: str = "text",
    batch_size: int = 64,
) -> Path:
    """Read ``input_path`` (CSV, TSV, JSON Lines or Parquet, by extension), add
    ``label``/``probability``/``prob_<label>`` columns, write ``output_path`` (format by its
    extension) atomically."""
    import pandas as pd

    if not input_path.is_file():
        raise InputError(input_path, "input file not found", fix="pass an existing --input file")
    in_format, out_format = table_format(input_path, None), table_format(output_path, None)
    frame = read_rows(input_path, in_format)
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
    write_rows(result, output_path, out_format)
    return output_path
