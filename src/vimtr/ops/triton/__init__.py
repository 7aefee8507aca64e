"""The ops on Triton kernels, for CUDA tensors without a CUDA build (torch's Linux wheels ship Triton).

Importing this package imports neither triton nor the kernels: they load on the first call, and whether
they run compiled (CUDA tensors) or in Triton's interpreter (CPU tensors, ``TRITON_INTERPRET=1``, for
tests) is fixed then, for the process.
"""
from vimtr.ops.triton.scan import (
    available,
    interpreted,
    kernel_config,
    selective_scan_triton,
    unsupported,
)

from vimtr.ops.triton.mixer import bimamba_inner_triton

__all__ = ["available", "bimamba_inner_triton", "interpreted", "kernel_config", "selective_scan_triton",
           "unsupported"]
