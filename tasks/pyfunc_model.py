"""The MLflow pyfunc wrapper of a trained ULMFiT classifier ("models from code").

Input: a DataFrame with a ``text`` column of raw texts. Output: a DataFrame with ``label`` (the
most probable label name), ``probability`` (its probability) and one ``prob_<label>`` column per
class: the forward/backward ensemble of paper section 3.3. The model's only artifact is the
directory written by ``ulmfit.predict.TextClassifier.save``; the ``ulmfit`` package travels with
the model (``code_paths``), so ``mlflow models serve`` needs no project checkout.
"""

from __future__ import annotations

import mlflow
import pandas as pd


class TextClassifierModel(mlflow.pyfunc.PythonModel):
    """Raw text in, labels and probabilities out."""

    def load_context(self, context) -> None:
        from ulmfit.predict import TextClassifier

        self.classifier = TextClassifier.load(context.artifacts["classifier"])

    def predict(self, context, model_input, params=None) -> pd.DataFrame:
        if isinstance(model_input, pd.DataFrame):
            if "text" not in model_input.columns:
                raise ValueError(
                    f"the input needs a 'text' column; it has {list(model_input.columns)}"
                )
            texts = model_input["text"].fillna("").astype(str).tolist()
        else:  # a list of strings, or a Series
            texts = [str(t) for t in model_input]
        batch_size = int((params or {}).get("batch_size", 64))
        labels, probs = self.classifier.predict(texts, batch_size=batch_size)
        out = pd.DataFrame(
            {"label": labels, "probability": probs.max(axis=1) if len(probs) else []}
        )
        for index, name in enumerate(self.classifier.label_names):
            out[f"prob_{name}"] = probs[:, index] if len(probs) else []
        return out


mlflow.models.set_model(TextClassifierModel())
