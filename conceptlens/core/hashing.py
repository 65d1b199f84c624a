"""The one content hasher: SHA-256 over file contents and over JSON descriptions.

Every cache key and every result's data hash comes from here, so "the same inputs" means the same
bytes everywhere: a copied or touched file hashes as before, an edited one does not. Reading a
file's bytes is memoized per process by ``(path, size, mtime_ns, inode)``, so a report that hashes
the same manifest for several analyzers reads each image once.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

__all__ = ["file_digest", "hash_files", "hash_tree", "hash_json"]

_MEMO = {}  # (path, size, mtime_ns, inode) -> digest bytes
_MEMO_LIMIT = 1_000_000  # entries (~150 MB at most); cleared, not evicted, past it


def file_digest(path):
    """SHA-256 digest (32 bytes) of a file's contents, or ``None`` when it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (os.fspath(path), st.st_size, st.st_mtime_ns, st.st_ino)
    digest = _MEMO.get(key)
    if digest is None:
        try:
            with open(path, "rb") as f:
                digest = hashlib.file_digest(f, "sha256").digest()
        except OSError:
            return None
        if len(_MEMO) >= _MEMO_LIMIT:
            _MEMO.clear()
        _MEMO[key] = digest
    return digest


def hash_files(paths, names=None, seed=b""):
    """Hex SHA-256 over ``(name, contents)`` of each file in order; a missing file counts as missing.

    Parameters
    ----------
    paths : iterable of path-like
    names : iterable of str, optional
        What each file is called in the hash (default: its path as given), so a tree hashes the
        same wherever it lies when named by relative paths.
    seed : bytes
        Hashed first (e.g. the table the files belong to).
    """
    paths = list(paths)
    names = [os.fspath(p) for p in paths] if names is None else list(names)
    h = hashlib.sha256(seed)
    for path, name in zip(paths, names, strict=True):
        h.update(str(name).encode() + b"\0")
        h.update(file_digest(path) or b"<missing>")
    return h.hexdigest()


def hash_tree(root, exclude=()):
    """:func:`hash_files` of every file under ``root`` (a file: just it), named by relative path."""
    root = Path(root)
    if root.is_file():
        return hash_files([root], [root.name])
    files = sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.relative_to(root).as_posix())
    files = [p for p in files if p.relative_to(root).as_posix() not in exclude]
    return hash_files(files, [p.relative_to(root).as_posix() for p in files])


def hash_json(obj):
    """Hex SHA-256 of a JSON description (keys sorted; non-JSON values by ``str``)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
