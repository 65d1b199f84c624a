"""Model correction: fix what a model relies on, and measure before/after.

- :func:`correct` — one entry point writing a corrected model every command loads:
  ``p-clarc`` (project the artifact CAV out, no training), ``a-clarc`` and ``rr-clarc``
  (fine-tune after the artifact layer; :mod:`~conceptlens.correction.clarc`) and ``rrr``
  (input gradients inside masks; :mod:`~conceptlens.correction.rrr`).
- :func:`evaluate_correction` — clean and attacked accuracy, artifact relevance share and TCAV
  audit of several models on the same test rows.
- :func:`train_rrr` — the demo CNN trained from scratch with the RRR penalty (decoy digits).

Correction sits above the analyzers, like the report: it uses ``concepts`` (CAVs, TCAV audits)
and ``attribution`` (LRP) through their public APIs.
"""

from .._lazy import lazy_exports

__all__ = ["correct", "CorrectedModel", "METHODS", "evaluate_correction", "CorrectionEvaluation", "Artifact",
           "ArtifactCAV", "fit_artifact_cav", "read_cav", "p_clarc", "rr_clarc_penalty", "DEFAULT_RR_CLARC_WEIGHT",
           "rrr_penalty", "train_rrr", "DEFAULT_RRR_WEIGHT"]

__getattr__, __dir__ = lazy_exports(__name__, {
    "correct": ["correct", "CorrectedModel", "METHODS"],
    "evaluate": ["evaluate_correction", "CorrectionEvaluation", "Artifact"],
    "clarc": ["ArtifactCAV", "fit_artifact_cav", "read_cav", "p_clarc", "rr_clarc_penalty", "DEFAULT_RR_CLARC_WEIGHT"],
    "rrr": ["rrr_penalty", "train_rrr", "DEFAULT_RRR_WEIGHT"],
})
