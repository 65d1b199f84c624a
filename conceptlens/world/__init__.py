"""Procedural "concept world" datasets with ground truth (the embedded default).

:func:`generate_world` draws small images, writes them as a classification manifest, a
Broden-style concept set with pixel masks, TCAV concept folders and a random pool, and plants
known effects. Two presets:

``shapes`` (:class:`WorldConfig`)
    Shapes × colours × textures on backgrounds with an optional watermark "tag": the tag
    co-occurs with one class in training, a hidden hollow/solid sub-class, label noise and
    near-duplicates across splits.
``histo`` (:class:`~conceptlens.world.histo_world.HistoConfig`)
    H&E-like histopathology patches (tumour, stroma, normal): acquisition sites whose stain
    colours co-occur with the classes in training, marker-pen strokes on one class, a hidden
    necrosis sub-class, patients (one site each) with planted leaks across splits, label noise
    and near-duplicates.

:func:`~conceptlens.world.digits.generate_decoy_digits` writes *decoy digits* (real scans from
scikit-learn with a class-coloured corner patch in training, Ross et al. 2017) with patch masks.
"""

from .._lazy import lazy_exports

__all__ = ["WorldConfig", "HistoConfig", "World", "generate_world", "PRESETS"]

# Submodules load on first use of their names: importing one analyzer loads only its own code.
__getattr__, __dir__ = lazy_exports(__name__, {
    "generate": ["PRESETS", "World", "WorldConfig", "generate_world"],
    "histo_world": ["HistoConfig"],
})
