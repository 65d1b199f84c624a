"""Concept sensitivity: CAVs, TCAV scores and their significance.

``TCAV(model, layers).run(concepts, random_pool, classes, data)`` returns a :class:`TCAVResult`
whose table gives, per (concept, layer, class), the TCAV score with a bootstrap CI, a two-sided
test against random-vs-random CAVs corrected across the experiment, and the CAVs' held-out
accuracy and stability; :meth:`TCAVResult.audit` turns it into pass/fail verdicts.
"""

from .._lazy import lazy_exports

__all__ = [
    "TCAV",
    "TCAVResult",
    "load_concept_sets",
    "load_image_pool",
    "DESIGNS",
    "CAVs",
    "fit_cavs",
    "CAV_METHODS",
    "two_sample_pvalues",
    "holm",
    "benjamini_hochberg",
    "adjust_pvalues",
    "bootstrap_ci",
    "mean_pairwise_cosine",
]

# Submodules load on first use of their names: importing one analyzer loads only its own code.
__getattr__, __dir__ = lazy_exports(__name__, {
    "cav": ["CAV_METHODS", "CAVs", "fit_cavs"],
    "stats": ["adjust_pvalues", "benjamini_hochberg", "bootstrap_ci", "holm", "mean_pairwise_cosine", "two_sample_pvalues"],
    "tcav": ["DESIGNS", "TCAV", "TCAVResult", "load_concept_sets", "load_image_pool"],
})
