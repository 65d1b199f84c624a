"""Errors raised for bad user input.

Every error a user can fix subclasses :class:`ConceptLensError` (itself a ``ValueError``), so the
CLI prints it as one line on stderr and exits with status 2 instead of showing a traceback.
"""

import difflib

__all__ = ["ConceptLensError", "closest_names", "did_you_mean"]


class ConceptLensError(ValueError):
    """Bad input: the message says what was expected, what came, and what to do."""


def closest_names(name, valid, n=3):
    """Return up to ``n`` names from ``valid`` closest to ``name`` (for "did you mean" hints)."""
    valid = list(valid)
    close = difflib.get_close_matches(name, valid, n=n, cutoff=0.4)
    if not close:
        # Prefix/substring matches help with dotted names such as "layer4" vs "layer4.1.conv2".
        close = [v for v in valid if name in v or v in name][:n]
    return close


def did_you_mean(name, valid, n=3):
    """``"; did you mean 'a', 'b'?"`` for the names of ``valid`` closest to ``name``, or ``""``."""
    close = closest_names(str(name), valid, n)
    return f"; did you mean {', '.join(map(repr, close))}?" if close else ""
