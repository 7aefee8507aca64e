"""Compile vimtr's Triton kernels for a CUDA GPU on a machine without one (no driver needed: Triton's own
front end and its bundled ptxas). Catches what the interpreter cannot: code that does not lower to GPU
code (types, layouts, unsupported ops). Run by tests/test_triton.py in a subprocess; by hand:

    python tests/triton_offline_compile.py [--arch 90] [--usage]

``--usage`` also prints registers / spill bytes per thread from ``ptxas -v`` for the configurations
scan.py may pick, which is what decides occupancy on the GPU. Exit status 0 when every kernel compiled.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # this process compiles; it never runs a kernel

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from vimtr.ops.triton import scan_kernels as K  # noqa: E402

HALF_PTRS = ("u_ptr", "delta_ptr", "z_ptr", "out_ptr", "B_ptr", "C_ptr", "dout_ptr", "du_ptr", "ddelta_ptr",
             "dz_ptr")
FLAGS = ("HAS_D", "HAS_Z", "HAS_BIAS", "SOFTPLUS", "REVERSE")
KERNELS = {"seq": (K.scan_fwd_seq_kernel, {"SAVE_STATES": True, "WANT_DSUM": True, "UNROLL": 4}),
           "chunked": (K.scan_fwd_kernel, {"SAVE_STATES": True, "WANT_DSUM": True}),
           "bwd": (K.scan_bwd_kernel, {"HAS_DLAST": True})}


def compile_kernel(name, flags, half, block_e, chunk, warps, arch):
    kernel, extra = KERNELS[name]
    consts = dict(zip(FLAGS, flags), **extra, BLOCK_E=block_e, BLOCK_N=16, CHUNK=chunk)
    sig = {a: "constexpr" if a in consts else (("*" + half if a in HALF_PTRS else "*fp32") if a.endswith("_ptr")
                                               else "i32") for a in kernel.arg_names}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})


def ptxas_usage(compiled, arch):
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    try:
        res = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}a", f.name, "-o", os.devnull],
                             capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", res.stderr + res.stdout)
    spill = re.search(r"(\d+) bytes spill stores", res.stderr + res.stdout)
    return (int(regs.group(1)) if regs else None), (int(spill.group(1)) if spill else None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (80 = A100, 90 = H100/H200)")
    ap.add_argument("--usage", action="store_true", help="print ptxas register use of candidate configs")
    args = ap.parse_args(argv)
    # every flag on with bf16 tensors, and every flag off with fp16: both sides of each constexpr branch
    for name in KERNELS:
        for flags, half in (((True,) * 5, "bf16"), ((False,) * 5, "fp16")):
            compile_kernel(name, flags, half, 4, 32, 4, args.arch)
            print(f"compiled {name} {half} flags={int(flags[0])} for sm_{args.arch}")
    if args.usage:
        for name, configs in (("seq", [(16, 32, 1), (32, 32, 2), (32, 32, 4), (64, 32, 4)]),
                              ("chunked", [(4, 32, 4), (8, 32, 4), (4, 64, 4), (16, 32, 8)]),
                              ("bwd", [(2, 32, 2), (4, 16, 4), (4, 32, 4), (8, 32, 8)])):
            for cfg in configs:
                regs, spill = ptxas_usage(compile_kernel(name, (True,) * 5, "bf16", *cfg, args.arch), args.arch)
                print(f"{name} BLOCK_E={cfg[0]} CHUNK={cfg[1]} warps={cfg[2]}: {regs} registers, {spill} B spilled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
