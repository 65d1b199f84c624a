"""Model correction: fix what a model relies on, and measure before/after.

:func:`~conceptlens.correction.rrr.train_rrr` trains the demo CNN with Ross et al.'s
"Right for the Right Reasons" input-gradient penalty inside annotation masks
(:func:`~conceptlens.correction.rrr.rrr_penalty`).
"""

from .._lazy import lazy_exports

__all__ = ["rrr_penalty", "train_rrr", "DEFAULT_RRR_WEIGHT"]

__getattr__, __dir__ = lazy_exports(__name__, {"rrr": ["rrr_penalty", "train_rrr", "DEFAULT_RRR_WEIGHT"]})
