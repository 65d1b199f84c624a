"""Procedural "concept world" datasets with ground truth (the embedded default).

:func:`generate_world` draws small images (shapes × colours × textures on backgrounds, an
optional watermark "tag"), writes them as a classification manifest, a Broden-style concept set
with pixel masks, TCAV concept folders and a random pool, and plants known effects: the tag
co-occurs with one class in training, a hidden hollow/solid sub-class, label noise and
near-duplicates across splits.
"""

from .._lazy import lazy_exports

__all__ = ["WorldConfig", "World", "generate_world", "PRESETS"]

# Submodules load on first use of their names: importing one analyzer loads only its own code.
__getattr__, __dir__ = lazy_exports(__name__, {
    "generate": ["PRESETS", "World", "WorldConfig", "generate_world"],
})
