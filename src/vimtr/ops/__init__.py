"""Kernels, each fast one beside its reference. Modules call only the dispatch functions exported here."""
from vimtr.ops.causal_conv import causal_conv1d_fn, causal_conv1d_ref
from vimtr.ops.selective_scan import (
    BACKENDS,
    get_scan_backend,
    resolve_scan,
    scan_backend,
    selective_scan_fn,
    selective_scan_ref,
    set_scan_backend,
)

__all__ = ["BACKENDS", "causal_conv1d_fn", "causal_conv1d_ref", "get_scan_backend", "resolve_scan",
           "scan_backend", "selective_scan_fn", "selective_scan_ref", "set_scan_backend"]
