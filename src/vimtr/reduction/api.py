"""``reduce(model, method, **params)`` / ``restore(model)``: ToMe-style patching in place, weights untouched."""
from __future__ import annotations


from vimtr.reduction.base import COMMON_PARAMS, TokenReducer

METHODS: dict[str, type[TokenReducer]] = {}


def register(cls: type[TokenReducer]) -> type[TokenReducer]:
    METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    return sorted(METHODS)


def _check_model(model):
    if not (hasattr(model, "layers") and hasattr(model, "forward_tokens") and hasattr(model, "reducer")):
        raise TypeError(f"reduce() works on vimtr Vision Mamba models (vimtr.create_model / load_model); got "
                        f"{type(model).__name__}. Wrap official weights with vimtr.load_model(checkpoint).")


def reduce(model, method: str, **params):
    """Patch ``model`` in place to reduce tokens with ``method``; returns the model.

    Every method accepts a schedule: ``r`` (int: tokens removed at each reducing block, chosen by
    ``interval``/``odd``; or a list with one entry per block) or ``flops_reduction`` (a fraction; the
    per-block schedule is derived with the analytic FLOPs counter), plus ``trace_source=True`` to record
    which patches each final token stands for. After each forward ``model.reduction_trace`` holds
    ``tokens``, ``cls_index``, ``sizes`` (and ``source``). Calling ``reduce`` again replaces the
    previous reduction; :func:`restore` removes it.
    """
    _check_model(model)
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise ValueError(f"unknown reduction method {method!r}; valid methods: {', '.join(list_methods())}")
    cls = METHODS[method.lower()]
    bad = sorted(set(params) - set(COMMON_PARAMS) - set(cls.PARAMS))
    if bad:
        raise TypeError(f"{cls.name}: unknown parameter(s) {bad}; valid: "
                        f"{', '.join(COMMON_PARAMS + tuple(cls.PARAMS))}")
    reducer = cls(model, **params)  # built (and validated) first: a failed call keeps the old reduction
    restore(model)
    model.reducer = reducer
    model.reduction = reducer.describe()
    return model


def restore(model):
    """Remove any reduction: the model is again exactly the original (bit-identical outputs)."""
    _check_model(model)
    model.reducer = None
    for attr in ("reduction", "reduction_trace"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model
