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
    reducer = make_reducer(model, method, **params)  # built (and validated) first: a failed call keeps the old one
    restore(model)
    model.reducer = reducer
    model.reduction = reducer.describe()
    return model


def method_class(method: str) -> type[TokenReducer]:
    """The registered method ``method`` (case-insensitive); ``ValueError`` naming the valid ones."""
    if not isinstance(method, str) or method.lower() not in METHODS:
        raise ValueError(f"unknown reduction method {method!r}; valid methods: {', '.join(list_methods())}")
    return METHODS[method.lower()]


def check_param_names(method: str, params) -> type[TokenReducer]:
    """``TypeError`` for a parameter ``method`` does not take (no model needed); returns the method's class."""
    cls = method_class(method)
    bad = sorted(set(params) - set(COMMON_PARAMS) - set(cls.PARAMS))
    if bad:
        raise TypeError(f"{cls.name}: unknown parameter(s) {bad}; valid: "
                        f"{', '.join(COMMON_PARAMS + tuple(cls.PARAMS))}")
    return cls


def make_reducer(model, method: str, **params) -> TokenReducer:
    """The reducer ``reduce(model, method, **params)`` would install, built and validated (names, values,
    schedule) without touching ``model``: what checking a request before any work needs."""
    _check_model(model)
    return check_param_names(method, params)(model, **params)


def max_flops_reduction(model, method: str, **params) -> float:
    """The largest ``full``-convention FLOPs reduction ``method`` can reach on ``model`` with this schedule
    (``interval``/``odd`` and the method's own parameters in ``params``; ``r``/``flops_reduction`` are
    ignored): what ``flops_reduction=`` may ask for, up to :data:`~vimtr.reduction.schedule.TOLERANCE`."""
    from vimtr.reduction.schedule import max_reduction

    params = {k: v for k, v in params.items() if k not in ("r", "flops_reduction")}
    return max_reduction(model, make_reducer(model, method, r=0, **params))


def restore(model):
    """Remove any reduction: the model is again exactly the original (bit-identical outputs)."""
    _check_model(model)
    model.reducer = None
    for attr in ("reduction", "reduction_trace"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model
