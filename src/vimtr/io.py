"""Atomic writes: a result or checkpoint is either the old file or the complete new one, never half."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def atomic_write(path, write_fn, mode: str = "wb"):
    """Call ``write_fn(file)`` on a temp file in the same folder, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json(path, obj):
    return atomic_write(path, lambda f: json.dump(obj, f, indent=2, sort_keys=False), mode="w")
