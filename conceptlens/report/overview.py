"""The report's overview: the model's predictions on the manifest, accuracy per class and split."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix

from ..core.result import Result, provenance

__all__ = ["Overview", "overview_from_logits"]


@dataclass(frozen=True)
class Overview(Result):
    """Predictions of the model on every manifest row, with its class names.

    Attributes
    ----------
    predictions : DataFrame
        ``manifest_row, image, label, split, predicted, confidence`` (one row per readable image).
    classes : list of str
        Logit order.
    provenance : dict
        Model spec, weights hash, manifest path and hash, ``n_images`` (manifest rows).
    probabilities : ndarray
        ``[len(predictions), len(classes)]`` softmax of the logits (the slice discovery's input).
    """

    predictions: pd.DataFrame = field(repr=False)
    classes: list
    provenance: dict = field(repr=False)
    probabilities: np.ndarray = field(repr=False, default=None)

    KIND, META = "overview", "overview.json"

    def accuracy(self):
        """Accuracy per split and class (rows with a label that is a class of the model)."""
        p = self.predictions[self.predictions["label"].isin(self.classes)]
        if p.empty:
            return pd.DataFrame(columns=["split", "class", "n", "accuracy"])
        correct = (p["label"] == p["predicted"]).astype(float)
        rows = []
        for split, g in p.assign(correct=correct).groupby("split", sort=True):
            rows.append({"split": split, "class": "(all)", "n": len(g), "accuracy": g["correct"].mean()})
            for cls in self.classes:
                gc = g[g["label"] == cls]
                if len(gc):
                    rows.append({"split": split, "class": cls, "n": len(gc), "accuracy": gc["correct"].mean()})
        return pd.DataFrame(rows)

    def confusion(self, split=None):
        """Confusion matrix (rows: true label, columns: predicted) as a DataFrame."""
        p = self.predictions[self.predictions["label"].isin(self.classes)]
        if split is not None:
            p = p[p["split"] == split]
        m = confusion_matrix(p["label"], p["predicted"], labels=self.classes)
        return pd.DataFrame(m, index=self.classes, columns=self.classes)

    def to_frame(self):
        return self.predictions.copy()

    def _write(self, directory):  # predictions.csv, probabilities.npy; overview.json
        self.predictions.to_csv(directory / "predictions.csv", index=False)
        np.save(directory / "probabilities.npy", self.probabilities)
        return {"classes": self.classes}

    @classmethod
    def _read(cls, directory, meta):
        frame = pd.read_csv(directory / "predictions.csv", keep_default_na=False,
                            dtype={"image": str, "label": str, "split": str, "predicted": str})
        return cls(predictions=frame, classes=meta["classes"], provenance=meta["provenance"],
                   probabilities=np.load(directory / "probabilities.npy"))


def overview_from_logits(model, manifest, rows, logits):
    """Tabulate the model's predictions from its logits ``[N, K]`` on manifest ``rows`` (the report's
    capture pass)."""
    classes = list(model.classes) if model.classes else [str(i) for i in range(logits.shape[1])]
    z = logits - logits.max(axis=1, keepdims=True)
    prob = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    frame = manifest.frame.iloc[rows]
    pred = pd.DataFrame({
        "manifest_row": rows,
        "image": frame["image"].to_numpy(),
        "label": frame["label"].astype(str).to_numpy() if "label" in frame else "",
        "split": frame["split"].astype(str).to_numpy() if "split" in frame else "all",
        "predicted": np.asarray(classes)[logits.argmax(1)],
        "confidence": prob.max(1).round(6),
    })
    return Overview(predictions=pred, classes=classes, probabilities=prob.astype(np.float32),
                    provenance=provenance(model, manifest, preprocessing=model.preprocessing_for(manifest).to_dict(),
                                          n_images=len(manifest)))
