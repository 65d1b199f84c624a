"""Result cache of the report: one directory per analyzer result, keyed by a hash of its inputs.

A key covers everything the result depends on (model weights hash, data fingerprints, parameters,
library version), so an unchanged spec reuses results and any change recomputes them; a result
is written to a temporary directory and renamed, so an interrupted run never leaves a half result
that looks complete.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from .. import __version__
from ..core.hashing import hash_json

__all__ = ["ResultCache"]

logger = logging.getLogger(__name__)


class ResultCache:
    """``get(name, key, compute, load)`` returns ``(result, cached)``.

    ``compute(directory)`` writes the result into ``directory``; ``load(directory)`` reads it back,
    also right after computing, so a fresh and a cached result are the same object type from the same
    files. Results of the same name with another key are removed when a new one is written.
    """

    def __init__(self, root):
        self.root = Path(root)

    def key(self, **inputs):
        return hash_json(dict(inputs, conceptlens_version=__version__))[:20]

    def get(self, name, key, compute, load):
        target = self.root / f"{name}-{key}"
        if (target / ".done").is_file():
            logger.info("report cache: reusing %s", target.name)
            return load(target), True
        tmp = self.root / f".{name}-{key}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            compute(tmp)
            (tmp / ".done").write_text("ok\n")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for stale in self.root.glob(f"{name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        # Loaded from the final place: a result may reference its files (images, a store).
        return load(target), False
