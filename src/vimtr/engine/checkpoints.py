"""Training checkpoints: written atomically, readable with ``torch.load(weights_only=True)``.

A checkpoint is a plain dict of tensors, containers and scalars (no pickled objects):

- ``vimtr``: ``{"model_name", "config", "reduction"}``: enough for :func:`vimtr.load_model` and
  ``vimtr eval --checkpoint`` to rebuild the reduced model from the file alone;
- ``model`` / ``model_ema``: state dicts; ``optimizer``, ``scheduler``, ``scaler``: their state dicts;
- ``rng``: one entry per rank with python, numpy, torch (and CUDA) generator states as lists/tensors;
- ``train``: epoch, batches done in that epoch, optimizer steps, history, timers and the run's config.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from vimtr.errors import UsageError
from vimtr.io import atomic_write


def save(obj: dict, path) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def load(path) -> dict:
    """A checkpoint written by :func:`save` (``weights_only=True``: nothing in it is imported or run)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UsageError(f"checkpoint {str(path)!r} does not exist; check the path (training writes "
                         f"OUTPUT/last.pt and OUTPUT/best.pt)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"checkpoint {str(path)!r} is not a readable weights-only checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(obj, dict) or "model" not in obj:
        raise UsageError(f"checkpoint {str(path)!r} has no 'model' weights; it was not written by vimtr retrain")
    return obj


def vimtr_record(model) -> dict:
    """``{"model_name", "config", "reduction"}`` of a vimtr model (what ``load_model`` rebuilds from)."""
    name, config = getattr(model, "model_name", None), getattr(model, "config", None)
    if not isinstance(name, str) or not isinstance(config, dict):
        raise UsageError(f"{type(model).__name__} has no model_name/config: build it with vimtr.create_model or "
                         f"vimtr.load_model so checkpoints can rebuild it")
    reduction = getattr(model, "reduction", None)
    return {"model_name": name, "config": dict(config),
            "reduction": None if reduction is None else {"method": reduction["method"],
                                                         "params": dict(reduction["params"])}}


def state_dict(model) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict:
    """This process's generator states as tensors/lists/scalars (``weights_only``-safe)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(mt), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # the current device (this rank's GPU)
    return state


def set_rng_state(state: dict):
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
