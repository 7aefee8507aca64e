"""vimtr's ops, the seam between the models and the kernels (the mamba_ssm pattern): each op has a
plain-PyTorch ``*_ref`` (:mod:`vimtr.ops.reference`), fast implementations beside it (:mod:`vimtr.ops.cpu`,
numba; :mod:`vimtr.ops.triton` where present), and one ``*_fn`` that picks among them
(:mod:`vimtr.ops.dispatch`: by device, dtype, grad mode and ``VIMTR_SCAN`` / :func:`set_scan_backend`).

    selective_scan_fn / _ref     the Mamba SSM recurrence (mamba_ssm's signature, + reverse, delta_sum_out)
    causal_conv1d_fn / _ref      causal depthwise conv1d + SiLU
    add_rms_norm_fn / _ref       residual add + RMSNorm, optionally through a :class:`RowMap`
    bimamba_inner_fn / _ref      Vim's bidirectional mixer up to out_proj
    selective_scan_gapped        the scan over a sequence with gaps (``decay_steps``), on any backend

What a fast path can give its caller beyond the op's output is a generic, documented argument:
``delta_sum_out`` (Σ over channels of the Δ a scan used, per token) and ``row_map`` (which input rows to
keep or average while normalising). ``import vimtr.ops`` loads neither numba nor triton.
"""
from vimtr.ops.dispatch import (
    BACKENDS,
    add_rms_norm_fn,
    bimamba_inner_fn,
    causal_conv1d_fn,
    get_scan_backend,
    resolve_scan,
    scan_backend,
    selective_scan_fn,
    set_scan_backend,
)
from vimtr.ops.reference import (
    add_rms_norm_ref,
    bimamba_inner_ref,
    causal_conv1d_bidir_ref,
    causal_conv1d_ref,
    selective_scan_gapped,
    selective_scan_ref,
)
from vimtr.ops.row_map import RowMap

__all__ = ["BACKENDS", "RowMap", "add_rms_norm_fn", "add_rms_norm_ref", "bimamba_inner_fn", "bimamba_inner_ref",
           "causal_conv1d_bidir_ref", "causal_conv1d_fn", "causal_conv1d_ref", "get_scan_backend", "resolve_scan",
           "scan_backend", "selective_scan_fn", "selective_scan_gapped", "selective_scan_ref",
           "set_scan_backend"]
