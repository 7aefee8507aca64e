"""Small shared helpers: atomic writes (a result or checkpoint is either the old file or the complete
new one, never half), JSON-safe conversion, and ``key=value`` parsing for ``--param``."""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import uuid
from pathlib import Path

import torch


def atomic_write(path, write_fn):
    """``write_fn(binary file)`` into a temp file beside ``path``, fsync, then rename over ``path``.

    A crash (even SIGKILL) leaves either the previous file or the complete new one, never half of it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not mkstemp: its files are private (0600); this one gets the usual umask permissions.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def jsonable(obj):
    """A JSON-safe copy (paths → str, tensors → lists, non-finite floats → None)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if isinstance(obj, (Path, torch.device, torch.dtype)):
        return str(obj)
    return repr(obj)


def write_json(path, obj):
    """Write JSON atomically."""
    text = json.dumps(jsonable(obj), indent=2)
    return atomic_write(path, lambda f: f.write(text.encode()))


def parse_value(text: str):
    """``--param`` values: int, float, bool (true/false), None (none/null), a comma list of those, else str."""
    if "," in text:
        return [parse_value(t.strip()) for t in text.split(",") if t.strip()]
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_param(item: str) -> tuple[str, object]:
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value (e.g. metric=x, ordered=false), got {item!r}")
    return key.strip(), parse_value(value.strip())
