"""The report's overview: the model's predictions on the manifest, accuracy per class and split."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import confusion_matrix

__all__ = ["Overview", "overview_from_logits"]


@dataclass(frozen=True)
class Overview:
    """Predictions of the model on every manifest row, with its class names.

    Attributes
    ----------
    predictions : DataFrame
        ``manifest_row, image, label, split, predicted, confidence`` (one row per readable image).
    classes : list of str
        Logit order.
    meta : dict
        Model spec, weights hash, manifest path and hash.
    """

    predictions: pd.DataFrame = field(repr=False)
    classes: list
    meta: dict

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

    def save(self, directory):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.predictions.to_csv(directory / "predictions.csv", index=False)
        (directory / "overview.json").write_text(json.dumps({"classes": self.classes, "meta": self.meta}, indent=1) + "\n")

    @classmethod
    def load(cls, directory):
        directory = Path(directory)
        info = json.loads((directory / "overview.json").read_text())
        frame = pd.read_csv(directory / "predictions.csv", keep_default_na=False,
                            dtype={"image": str, "label": str, "split": str, "predicted": str})
        return cls(predictions=frame, classes=info["classes"], meta=info["meta"])


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
    meta = {"model": model.spec, "weights_hash": model.weights_hash, "manifest": str(manifest.path),
            "manifest_hash": manifest.content_hash(), "n_images": len(manifest), "n_predicted": len(rows)}
    return Overview(predictions=pred, classes=classes, meta=meta)
