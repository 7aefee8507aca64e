"""The ops' CPU implementations: numba kernels compiled at first use (no build step) and cached on disk.

    runtime.py        fast-math policy, the vectorisable exp, the thread pool, tensors -> kernel arguments
    vec16.py          16 floats as one LLVM vector (Vim's state size N = 16 in registers)
    rows.py           moving rows between strided tensors and row buffers
    recurrence.py     the scan recurrence (forward and backward; generic N and N = 16), each written once
    scan_forward.py   the scan forward kernel        scan_backward.py  the scan backward kernel
    scan.py           selective_scan_cpu (+ its autograd), scan_delta_cpu, gated_sum_cpu
    conv.py           both depthwise convs of the mixer in one pass (and its backward)
    norm.py           residual add + RMSNorm, optionally through a row map
    mixer.py          the bidirectional mixer up to out_proj, in the kernels' layout

Importing this package imports numba; :mod:`vimtr.ops.dispatch` does so on the first CPU call only.

numba's disk cache (``__pycache__/*.nbi, *.nbc`` beside these files) checks only the file that defines a
compiled function, while the kernels compile the helpers they call (recurrence.py, rows.py, runtime.py,
vec16.py) into themselves: after an edit to a helper, the kernels of scan_forward.py, scan_backward.py,
scan.py, conv.py and norm.py load their old machine code until their own file changes or the cache files
are deleted. Delete them after such an edit (and in any checkout that merges one).
"""
from vimtr.ops.cpu.conv import causal_conv1d_bidir_cpu
from vimtr.ops.cpu.mixer import bimamba_inner_cpu
from vimtr.ops.cpu.norm import add_rms_norm_cpu
from vimtr.ops.cpu.scan import gated_sum_cpu, scan_delta_cpu, selective_scan_cpu

__all__ = ["add_rms_norm_cpu", "bimamba_inner_cpu", "causal_conv1d_bidir_cpu", "gated_sum_cpu", "scan_delta_cpu",
           "selective_scan_cpu"]
