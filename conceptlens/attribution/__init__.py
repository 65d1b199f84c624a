"""Per-sample attributions for drill-down views: methods, faithfulness evaluation, SpRAy.

- :func:`attribute` — one signature over captum, zennit and our own RISE and SmoothTaylor (:func:`list_methods`);
  :func:`supports` / :func:`check_method` — whether a method runs faithfully on a model.
- :func:`smooth_taylor` — SmoothTaylor attributions with the noise scale each image used (adaptive search).
- :func:`region_perturbation` (MoRF/LeRF, AOPC) and :func:`localization` (relevance mass, pointing game).
- :func:`spray` / :func:`spray_class` — clusters of a class's explanation strategies.
- :func:`explain` — maps of a few images (their PNG gallery: :func:`conceptlens.plotting.write_explanation_gallery`).
"""

from .._lazy import lazy_exports

__all__ = [
    "METHODS", "Method", "attribute", "auto_layer", "check_method", "supports", "list_methods", "method_info",
    "BASELINES", "PerturbationResult", "LocalizationResult", "region_perturbation", "localization",
    "SprayResult", "spray", "spray_class", "prepare_maps",
    "Explanations", "explain", "smooth_taylor",
]

# Submodules load on first use of their names: importing one analyzer loads only its own code.
__getattr__, __dir__ = lazy_exports(__name__, {
    "evaluate": ["BASELINES", "LocalizationResult", "PerturbationResult", "localization", "region_perturbation"],
    "explain": ["Explanations", "explain"],
    "methods": ["METHODS", "Method", "attribute", "auto_layer", "check_method", "list_methods", "method_info", "supports"],
    "spray": ["SprayResult", "prepare_maps", "spray", "spray_class"],
    "smooth_taylor": ["smooth_taylor"],
})
