"""One random stream per (seed, image, step): results never depend on how images are batched."""

import hashlib

import torch


def generator(seed, *keys):
    """A CPU ``torch.Generator`` seeded from ``seed`` and ``keys`` (e.g. image index, step).

    The keys are hashed rather than added to the seed, so ``(seed=0, image=1)`` and
    ``(seed=1, image=0)`` get unrelated streams.
    """
    text = ":".join(str(int(k)) for k in (seed, *keys))
    g = torch.Generator()
    g.manual_seed(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1)
    return g
