"""Per-sample attributions for drill-down views: methods, faithfulness evaluation, SpRAy.

- :func:`attribute` — one signature over captum, zennit and our own RISE (:func:`list_methods`).
- :func:`region_perturbation` (MoRF/LeRF, AOPC) and :func:`localization` (relevance mass, pointing game).
- :func:`spray` / :func:`spray_class` — clusters of a class's explanation strategies.
- :func:`explain` — maps, heatmap and overlay PNGs and a JSON index for a few images.
"""

from .evaluate import BASELINES, LocalizationResult, PerturbationResult, localization, region_perturbation
from .explain import Explanations, explain, heatmap_rgb
from .methods import METHODS, Method, attribute, auto_layer, list_methods, method_info
from .spray import SprayResult, prepare_maps, spray, spray_class

__all__ = [
    "METHODS", "Method", "attribute", "auto_layer", "list_methods", "method_info",
    "BASELINES", "PerturbationResult", "LocalizationResult", "region_perturbation", "localization",
    "SprayResult", "spray", "spray_class", "prepare_maps",
    "Explanations", "explain", "heatmap_rgb",
]
