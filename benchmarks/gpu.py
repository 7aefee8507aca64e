"""Everything vimtr wants to know from one CUDA GPU, in one run of at most ~8 minutes, written as JSON.

    python benchmarks/gpu.py [--out benchmarks/results/gpu.json] [--budget-s 420]

Sections, in order (the JSON is rewritten after each, so a run cut short keeps what it measured):
1. ``golden``: the golden cases (tests/golden: Vim-Ti P1/P1b, R-MeeTo r=11 P2/P2b) on the GPU in fp32 (TF32
   off) through the Triton scan, and mamba_ssm's when it imports; the CPU tolerance 1e-4 + 1e-4·|golden|.
2. ``kernel_check``: the Triton scan against ``selective_scan_ref`` at Vim-S shapes (fp32, bf16, both
   directions, gradients, the Δ sum) at the interpreter tests' (fp32) and mamba_ssm's (bf16) tolerances;
   and whole models (Vim-S, unreduced and reduced) on the Triton scan against the reference loop.
3. ``sweep``: forward (both kernels) and backward configs timed at Vim-S batch 128, bf16, the mixer's
   layouts; the fastest run the rest (``--no-tune``: the defaults), candidates for scan.py's defaults.
4. ``retrain``: one re-training step of Vim-S at batch 128 in bf16 (AdamW, cross-entropy): step time and
   peak memory, unreduced and R-MeeTo r=11, per backend; the reference loop last (out of memory expected).
5. ``throughput``: forward images/s of Vim-Ti/S/B at batch 128 under fp16 and bf16 autocast, unreduced,
   ``rmeeto`` r=5 and r=11, ``mtr`` at 30% FLOPs; Triton, the reference loop and mamba_ssm (if present)
   interleaved per cell. R-MeeTo's protocol (warm-up, timed forwards, median) with fewer forwards than
   its 100 + 30 to fit the budget (counts in the JSON); the reference loop 1 + 3, at batch 128 while that
   fits, else smaller, each record naming its batch. Derived: each reduced model's speed-up over the
   unreduced one divided by its FLOPs ratio (the fraction of the saving realised).
6. ``profile``: top kernels of a Vim-S batch-128 bf16 forward on the Triton scan: do conv or norm matter?
7. ``targets``: the issue's targets, each with the measured value and whether it is met.

Without a CUDA device it prints one line saying so and exits 0. ``--dry-run-cpu`` runs every section on
CPU tensors under Triton's interpreter (TRITON_INTERPRET=1) with tiny models, shapes and counts, so each
code path has run before anyone spends GPU time on it (tests/test_triton.py does); its timings mean
nothing, and its golden section uses the numba CPU scan (Vim-Ti in the interpreter would take minutes).
Backends are chosen with ``vimtr.ops.scan_backend(name)``; until "triton" is in ``vimtr.ops.BACKENDS``
(the dispatch integration), :func:`use_backend` routes the mixer's general path to the Triton scan.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
try:
    import vimtr
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT / "src"))
    import vimtr
from vimtr.io import write_json  # noqa: E402
from vimtr.ops import selective_scan_ref  # noqa: E402
from vimtr.ops.triton import available, kernel_config, selective_scan_triton  # noqa: E402  (kernels load lazily)

NO_CUDA = ("gpu.py: no CUDA device here (torch.cuda.is_available() is False), nothing measured; run it on a "
           "machine with an NVIDIA GPU (--dry-run-cpu exercises the script on CPU)")
GOLDEN_TOL = 1e-4
# (rtol, atol) of mamba_ssm's tests/ops/test_selective_scan.py for bf16: output (3e-2, 5e-2), du x2,
# ddelta rtol x5 / atol x10, weights max((1e-3, 1e-3), (rtol, atol)) with dA's atol x5, dB/dC as the output.
BF16_TOL = {"out": (3e-2, 5e-2), "du": (6e-2, 1e-1), "ddelta": (1.5e-1, 5e-1), "dA": (3e-2, 2.5e-1),
            "dB": (3e-2, 5e-2), "dC": (3e-2, 5e-2), "dD": (3e-2, 5e-2), "dz": (3e-2, 5e-2),
            "ddelta_bias": (3e-2, 5e-2)}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu.json"))
    ap.add_argument("--budget-s", type=float, default=420.0,
                    help="wall-clock budget; sections check it and record what they had to skip")
    ap.add_argument("--no-tune", action="store_true", help="keep the default kernel configs after the sweep")
    ap.add_argument("--dry-run-cpu", action="store_true",
                    help="tiny shapes on CPU under Triton's interpreter, to exercise the script")
    return ap.parse_args(argv)


class Budget:
    def __init__(self, seconds):
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self):
        return self.seconds - (time.perf_counter() - self.start)

    def elapsed(self):  # seconds since the start, for the log and the JSON
        return round(time.perf_counter() - self.start, 1)


class Plan:
    """Shapes and counts of the real run, or the dry run's tiny stand-ins."""
    def __init__(self, dry: bool):
        self.dry = dry
        self.device = "cpu" if dry else "cuda"
        if dry:  # 17 tokens, 4 blocks, E = 32: ~1 s a forward in the interpreter
            self.models = {"vim_tiny": dict(depth=4, embed_dim=16, img_size=32, patch_size=8, num_classes=10)}
            self.retrain_model = ("vim_tiny", self.models["vim_tiny"])
            self.batch, self.retrain_batch, self.dtypes, self.golden_cases = 1, 1, ("bf16",), ("p1",)
            self.warmup, self.runs, self.ref_warmup, self.ref_runs, self.retrain_steps = 0, 1, 0, 1, (1, 1)
            self.scan_shape, self.check_shape = dict(batch=1, dim=16, length=9), dict(batch=1, dim=8, length=13)
        else:
            self.models = {"vim_small": {}, "vim_tiny": {}, "vim_base": {}}  # Vim-S first: the targets name it
            self.retrain_model = ("vim_small", {})
            self.batch, self.retrain_batch, self.dtypes = 128, 128, ("fp16", "bf16")
            self.golden_cases = ("p1", "p1b", "p2", "p2b")
            self.warmup, self.runs, self.ref_warmup, self.ref_runs, self.retrain_steps = 10, 20, 1, 3, (2, 5)
            self.scan_shape, self.check_shape = dict(batch=128, dim=768, length=197), dict(batch=2, dim=768, length=197)
        self.reductions = {"none": None, "rmeeto_r5": ("rmeeto", dict(r=5)), "rmeeto_r11": ("rmeeto", dict(r=11)),
                           "mtr_30": ("mtr", dict(flops_reduction=0.3))}


# ------------------------------------------------------------------------------------------ backends
def backends(plan) -> dict:
    """name -> None where usable here, else why not. "mamba_ssm" is vimtr's "cuda" backend."""
    out = {"triton": None if available(plan.device) else "vimtr.ops.triton is not available on this device",
           "reference": None, "mamba_ssm": "dry run (CPU)" if plan.dry else None}
    if not plan.dry:
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # noqa: F401
        except Exception as exc:  # ImportError, or a build whose extension does not load
            out["mamba_ssm"] = f"mamba_ssm does not import: {type(exc).__name__}: {exc}"[:300]
    return out


@contextlib.contextmanager
def use_backend(name: str):
    """Run the models' selective scans on ``name`` ("triton", "reference", "mamba_ssm", or "cpu").

    Once the dispatch knows "triton", this is ``vimtr.ops.scan_backend``. Before that (the ops refactor
    and this branch landing separately), "triton" is reached by selecting the reference backend (so the
    mixer takes its general path, which calls ``vimtr.ops.selective_scan.selective_scan_fn`` per
    direction) and pointing that module's ``resolve_scan`` at the Triton scan for the duration.
    """
    import vimtr.ops as ops
    vimtr_name = {"mamba_ssm": "cuda"}.get(name, name)
    if vimtr_name in ops.BACKENDS:
        with ops.scan_backend(vimtr_name):
            yield
        return
    if name != "triton":
        raise ValueError(f"unknown backend {name!r}")
    import vimtr.ops.selective_scan as legacy
    original = legacy.resolve_scan
    legacy.resolve_scan = lambda device: ("triton", selective_scan_triton)
    try:
        with ops.scan_backend("reference"):
            yield
    finally:
        legacy.resolve_scan = original


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def autocast(device, dtype_name):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype_name)
    return torch.autocast(torch.device(device).type, dtype=dtype) if dtype else contextlib.nullcontext()


@contextlib.contextmanager
def no_tf32():
    """fp32 comparisons need fp32 matmuls and convolutions (cuDNN's convolutions default to TF32)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def median_seconds(fn, warmup: int, runs: int, device) -> dict:
    times = []
    for i in range(warmup + runs):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return dict(median_s=statistics.median(times), min_s=min(times), max_s=max(times), runs=runs, warmup=warmup)


# ------------------------------------------------------------------------------------------ sections
def section_golden(plan, usable, budget):
    """Golden cases through each usable GPU backend (in the dry run: the numba CPU scan stands in)."""
    from safetensors.torch import load_file

    gdir = ROOT / "tests" / "golden"
    if not (gdir / "p1_vim_tiny.safetensors").exists():
        return {"skipped": f"{gdir} not found (the golden files ship with the repository, not the wheel)"}
    if plan.dry:  # a full Vim-Ti in the interpreter takes minutes: the numba CPU scan stands in
        usable = {"cpu": None}
    stems = {"p1": "p1_vim_tiny", "p1b": "p1b_vim_tiny_perturbed", "p2": "p2_rmeeto_tiny_r11",
             "p2b": "p2b_rmeeto_tiny_r11_perturbed"}
    base = load_file(gdir / "p1_vim_tiny.safetensors")
    pert = load_file(gdir / "p1b_vim_tiny_perturbed.safetensors")

    def weights(perturbed):
        sd = {k[8:]: v.float() for k, v in base.items() if k.startswith("weights.")}
        if perturbed:
            sd.update({k[8:]: v.float() for k, v in pert.items() if k.startswith("weights.")})
        return sd

    def compare(ours, ref):
        diff = (ours.detach().float().cpu() - ref).abs()
        bad = int((diff > GOLDEN_TOL + GOLDEN_TOL * ref.abs()).sum())
        return {"max_abs_diff": float(diff.max()), "n_out_of_tol": bad, "ok": bad == 0}

    names = [b for b in ("triton", "mamba_ssm", "cpu") if usable.get(b, "") is None]
    out = {"tolerance": f"|ours - golden| <= {GOLDEN_TOL} + {GOLDEN_TOL}*|golden|", "tf32": False}
    with no_tf32():
        x = base["input"].to(plan.device)
        for name in names:
            res = out[name] = {}
            for case in plan.golden_cases:
                if budget.left() < 30:
                    res[case] = {"skipped": "time budget"}
                    continue
                ref = load_file(gdir / f"{stems[case]}.safetensors")
                model = vimtr.create_model("vim_tiny").eval()
                model.load_state_dict(weights(case in ("p1b", "p2b")), strict=True)
                model.to(plan.device)
                if case.startswith("p2"):
                    vimtr.reduce(model, "rmeeto", r=11, compare=11)
                with use_backend(name), torch.no_grad():
                    state = model.forward_tokens(x)
                    features = state.hidden[:, state.cls_index]
                    logits = model.head(features)
                r = {"features": compare(features, ref["features"]), "logits": compare(logits, ref["logits"])}
                if case.startswith("p2"):
                    meta = json.loads((gdir / f"{stems[case]}.json").read_text())
                    r["tokens_match"] = model.reduction_trace["tokens"] == meta["seq_len_after_each_block"]
                else:
                    r["final_norm"] = compare(state.hidden, ref["final_norm"])
                r["ok"] = all(v["ok"] for v in r.values() if isinstance(v, dict)) and r.get("tokens_match", True)
                res[case] = r
    return out


def _scan_inputs(batch, dim, length, dtype, device, seed=0):
    """Inputs shaped and laid out as Vim's mixer passes them: u (B, E, L) contiguous, delta a (B, E, L) view
    of (B, L, E) storage, z a view of the in_proj output, B and C contiguous (B, N, L)."""
    g, N = torch.Generator().manual_seed(seed), 16
    u = torch.randn(batch, dim, length, generator=g)
    delta = (torch.randn(batch, length, dim, generator=g) * 1.5 - 4.0).transpose(1, 2)
    z = torch.randn(batch, 2 * dim, length, generator=g)[:, dim:]
    A = -torch.exp(torch.rand(dim, N, generator=g) * 2.5)
    Bm, Cm = torch.randn(batch, N, length, generator=g), torch.randn(batch, N, length, generator=g)
    D, bias = torch.randn(dim, generator=g), torch.rand(dim, generator=g) * 0.5
    half = [t.to(device=device, dtype=dtype) for t in (u, delta, Bm, Cm, z)]
    return half[0], half[1], A.to(device), half[2], half[3], D.to(device), half[4], bias.to(device)


def _rel(ours, ref):
    """max |ours − ref| / max |ref| (one number per tensor)."""
    ours, ref = ours.detach().float(), ref.detach().float()
    return float((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def section_kernel_check(plan, usable, budget):
    if usable["triton"] is not None:
        return {"skipped": usable["triton"]}
    out = {}
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for reverse in (False, True):
            args = _scan_inputs(**plan.check_shape, dtype=dtype, device=plan.device)
            mine = [a.detach().clone().requires_grad_() for a in args]
            ref_in = [a.detach().clone().requires_grad_() for a in args]
            dsum = torch.zeros(args[0].shape[0], args[0].shape[2], device=plan.device)
            y = selective_scan_triton(*mine, delta_softplus=True, reverse=reverse, delta_sum_out=dsum)
            flip = (lambda t: t.flip(-1)) if reverse else (lambda t: t)
            r = [flip(t) if i in (0, 1, 3, 4, 6) else t for i, t in enumerate(ref_in)]
            y_ref = flip(selective_scan_ref(*r, delta_softplus=True))
            g = torch.randn_like(y)
            y.backward(g)
            y_ref.backward(g)
            errs = {"out": _rel(y, y_ref),
                    "delta_sum": _rel(dsum, F.softplus(args[1].float() + args[7][:, None]).sum(1))}
            errs.update({"d" + n: _rel(a.grad, b.grad) for n, a, b in zip(names, mine, ref_in)})
            if dtype == torch.float32:
                ok = errs["out"] <= 1e-5 and errs["delta_sum"] <= 1e-5 and all(
                    v <= 1e-4 for k, v in errs.items() if k.startswith("d") and k != "delta_sum")
                tol = "max|diff|/max|ref|: 1e-5 forward, 1e-4 gradients"
            else:
                pairs = [("out", y, y_ref)] + [("d" + n, a.grad, b.grad) for n, a, b in zip(names, mine, ref_in)]
                ok = all(torch.allclose(a.float(), b.float(), *BF16_TOL[n]) for n, a, b in pairs)
                tol = "mamba_ssm's tests/ops/test_selective_scan.py bf16 tolerances, per tensor"
            out[f"{dtype_name}_{'reverse' if reverse else 'forward'}"] = {"rel_err": errs, "ok": bool(ok),
                                                                           "tolerance": tol}
    out["models"] = _model_check(plan)
    return out


def _model_check(plan):
    """A whole model (Vim-S; the dry run's tiny one) on the Triton scan against the reference loop, in
    fp32 at batch 2, unreduced and reduced: max |diff| / max |logit|, and the tokens kept per block."""

    name = "vim_tiny" if plan.dry else "vim_small"
    model = _make(name, plan.models[name], plan)
    x = torch.randn(2, *model.input_size, generator=torch.Generator().manual_seed(1)).to(plan.device)
    out = {"model": name}
    for red, spec in plan.reductions.items():
        vimtr.restore(model)
        if spec:
            vimtr.reduce(model, spec[0], **spec[1])
        with torch.no_grad(), no_tf32():
            with use_backend("triton"):
                ours, tokens = model(x), getattr(model, "reduction_trace", {}).get("tokens")
            with use_backend("reference"):
                ref = model(x)
        out[red] = {"rel_err": _rel(ours, ref), "tokens": tokens,
                    "same_tokens": tokens == getattr(model, "reduction_trace", {}).get("tokens")}
    return out


def section_sweep(plan, usable, budget, tune: bool):
    """Time forward (both kernels) and backward configs; install the fastest with kernel_config."""
    if usable["triton"] is not None:
        return {"skipped": usable["triton"]}, None
    args = _scan_inputs(**plan.scan_shape, dtype=torch.bfloat16, device=plan.device)
    fwd = [("seq", c) for c in ((16, 32, 2), (32, 32, 2), (32, 32, 4), (64, 32, 4), (64, 32, 8))] + \
          [("chunked", c) for c in ((2, 32, 2), (4, 32, 4), (8, 32, 4), (4, 64, 4))]
    bwd = [(2, 32, 2), (4, 16, 4), (4, 32, 4), (8, 32, 8), (2, 64, 4)]
    if plan.dry:
        fwd, bwd = fwd[:1] + fwd[-1:], bwd[:1]
    reps = (0, 1) if plan.dry else (2, 10)
    res = {"shape": plan.scan_shape, "dtype": "bf16", "forward": [], "backward": []}
    for kind, cfg in fwd:
        if budget.left() < 200:
            res["forward"].append({"kernel": kind, "config": cfg, "skipped": "time budget"})
            continue
        with kernel_config(fwd=cfg, fwd_kernel=kind), torch.no_grad():
            t = median_seconds(lambda: selective_scan_triton(*args, delta_softplus=True), *reps, plan.device)
        res["forward"].append({"kernel": kind, "config": cfg, "ms": t["median_s"] * 1e3})
    grads = [a.detach().clone().requires_grad_() for a in args]
    for cfg in bwd:
        if budget.left() < 180:
            res["backward"].append({"config": cfg, "skipped": "time budget"})
            continue
        with kernel_config(bwd=cfg):
            y = selective_scan_triton(*grads, delta_softplus=True)
            g = torch.ones_like(y)
            t = median_seconds(lambda: torch.autograd.grad(y, grads, g, retain_graph=True), *reps, plan.device)
        res["backward"].append({"config": cfg, "ms": t["median_s"] * 1e3})
    timed_f, timed_b = [r for r in res["forward"] if "ms" in r], [r for r in res["backward"] if "ms" in r]
    best = None
    if timed_f and timed_b:
        bf, bb = min(timed_f, key=lambda r: r["ms"]), min(timed_b, key=lambda r: r["ms"])
        best = {"fwd_kernel": bf["kernel"], "fwd": tuple(bf["config"]), "bwd": tuple(bb["config"])}
        res["best"] = best
    res["used_for_the_rest"] = best if tune else "the defaults"
    return res, (best if tune else None)


def _make(name, overrides, plan):
    return vimtr.create_model(name, **overrides).eval().to(plan.device)


def section_retrain(plan, usable, budget):
    name, overrides = plan.retrain_model
    out = {"model": name, "batch": plan.retrain_batch, "amp": "bf16", "optimizer": "AdamW lr 1e-5",
           "steps": {"warmup": plan.retrain_steps[0], "timed": plan.retrain_steps[1]}}
    fast = [b for b in ("triton", "mamba_ssm") if usable[b] is None]
    # the reference loop last: at batch 128 it is expected to run out of memory (recorded as such)
    for backend, reduction in [(b, r) for r in ("none", "rmeeto_r11") for b in fast] + [("reference", "none")]:
        key = f"{backend}/{reduction}"
        if budget.left() < (150 if backend != "reference" else 120):
            out[key] = {"skipped": "time budget"}
            continue
        model = _make(name, overrides, plan).train()
        if reduction != "none":
            method, params = plan.reductions[reduction]
            vimtr.reduce(model, method, **params)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(plan.retrain_batch, *model.input_size, generator=g).to(plan.device)
        y = torch.randint(0, model.head.out_features, (plan.retrain_batch,), generator=g).to(plan.device)

        def step():
            with autocast(plan.device, "bf16"):
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        if plan.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            with use_backend(backend):
                warm, timed = plan.retrain_steps if backend != "reference" else (0, 1)
                r = median_seconds(step, warm, timed, plan.device)
            r["images_per_s"] = plan.retrain_batch / r["median_s"]
        except torch.cuda.OutOfMemoryError as exc:
            r = {"out_of_memory": str(exc).splitlines()[0][:300]}
        if plan.device == "cuda":
            r["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
            r["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
        out[key] = r
        del model, opt
        if plan.device == "cuda":
            torch.cuda.empty_cache()
    return out


def section_throughput(plan, usable, budget):
    names = [b for b in ("triton", "mamba_ssm") if usable[b] is None] + ["reference"]
    out = {"batch": plan.batch, "protocol": {"warmup": plan.warmup, "runs": plan.runs, "statistic": "median",
                                             "reference": {"warmup": plan.ref_warmup, "runs": plan.ref_runs},
                                             "rmeeto_paper": {"warmup": 100, "runs": 30, "dtype": "fp16"}},
           "cells": []}
    ref_batch = plan.batch
    for model_name, overrides in plan.models.items():
        model = _make(model_name, overrides, plan)
        for dtype_name in plan.dtypes:
            for red_name, spec in plan.reductions.items():
                cell = {"model": model_name, "dtype": dtype_name, "reduction": red_name}
                out["cells"].append(cell)
                vimtr.restore(model)
                try:
                    if spec:
                        vimtr.reduce(model, spec[0], **spec[1])
                except ValueError as exc:  # a schedule this model cannot have: record, go on
                    cell["error"] = str(exc)[:300]
                    continue
                cell["gflops_per_image"] = vimtr.flops(model) / 1e9
                for backend in names:
                    is_ref = backend == "reference"
                    need = 60 if is_ref else 25
                    if budget.left() < need:
                        cell[backend] = {"skipped": "time budget"}
                        continue
                    batch = ref_batch if is_ref else plan.batch
                    x = torch.randn(batch, *model.input_size, generator=torch.Generator().manual_seed(0))
                    x = x.to(plan.device)

                    def fwd():
                        with torch.no_grad(), autocast(plan.device, dtype_name):
                            model(x)

                    try:
                        with use_backend(backend):
                            w, n = (plan.ref_warmup, plan.ref_runs) if is_ref else (plan.warmup, plan.runs)
                            r = median_seconds(fwd, w, n, plan.device)
                    except torch.cuda.OutOfMemoryError as exc:
                        cell[backend] = {"out_of_memory": str(exc).splitlines()[0][:200], "batch": batch}
                        continue
                    r.update(batch=batch, images_per_s=batch / r["median_s"])
                    if is_ref and not plan.dry and r["median_s"] * (plan.ref_runs + 1) > 20 and ref_batch > 16:
                        ref_batch //= 2  # keep the loop inside the budget; each record names its batch
                    cell[backend] = r
        del model
        if plan.device == "cuda":
            torch.cuda.empty_cache()
    out["derived"] = _derive(out["cells"], names)
    return out


def _derive(cells, names):
    """Per (model, dtype, backend): each reduction's speed-up, FLOPs ratio and the fraction realised;
    per cell: Triton's speed-up over the reference loop and its time relative to mamba_ssm."""
    rows = []
    base = {(c["model"], c["dtype"]): c for c in cells if c["reduction"] == "none"}
    for c in (c for c in cells if "gflops_per_image" in c):
        b = base.get((c["model"], c["dtype"]))
        row = {"model": c["model"], "dtype": c["dtype"], "reduction": c["reduction"]}
        for name in names:
            ips = c.get(name, {}).get("images_per_s")
            ips0 = b.get(name, {}).get("images_per_s") if b else None
            if c["reduction"] != "none" and ips and ips0:
                flops_ratio = b["gflops_per_image"] / c["gflops_per_image"]
                row[name] = {"speedup": ips / ips0, "flops_ratio": flops_ratio,
                             "realised": (ips / ips0) / flops_ratio}
        t = c.get("triton", {}).get("images_per_s")
        if t and c.get("reference", {}).get("images_per_s"):
            row["triton_over_reference"] = t / c["reference"]["images_per_s"]
        if t and c.get("mamba_ssm", {}).get("images_per_s"):
            row["mamba_ssm_over_triton"] = c["mamba_ssm"]["images_per_s"] / t
        rows.append(row)
    return rows


def section_profile(plan, usable, budget):
    from torch.profiler import ProfilerActivity, profile
    if usable["triton"] is not None:
        return {"skipped": usable["triton"]}
    if budget.left() < 20:
        return {"skipped": "time budget"}
    name = "vim_small" if not plan.dry else "vim_tiny"
    model = _make(name, plan.models.get(name, {}), plan)
    x = torch.randn(plan.batch, *model.input_size).to(plan.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if plan.device == "cuda" else [])
    with use_backend("triton"), torch.no_grad(), autocast(plan.device, "bf16"):
        model(x)
        sync(plan.device)
        with profile(activities=activities) as prof:
            model(x)
            sync(plan.device)
    attr = "device_time_total" if plan.device == "cuda" else "cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr, 0) > 0]
    total = sum(getattr(e, "self_" + attr, 0) for e in events) or 1
    top = sorted(events, key=lambda e: getattr(e, "self_" + attr, 0), reverse=True)[:15]
    return {"model": name, "batch": plan.batch, "dtype": "bf16", "clock": attr,
            "top": [{"name": e.key[:120], "self_ms": getattr(e, "self_" + attr) / 1e3,
                     "share": getattr(e, "self_" + attr) / total, "calls": e.count} for e in top]}


def targets(res):
    """The issue's targets, from the measurements (None where not measured)."""
    out = {}
    rows = res.get("throughput", {}).get("derived", [])
    small = [r for r in rows if r["model"] == "vim_small" and r["reduction"] == "none"]

    def target(name, text, values, worst, ok):
        v = worst(values) if values else None
        out[name] = {"target": text, "value": v, "met": ok(v) if v is not None else None}

    target("vim_small_triton_over_reference", ">= 20", [r["triton_over_reference"] for r in small
                                                        if "triton_over_reference" in r], min, lambda v: v >= 20)
    target("vim_small_mamba_ssm_over_triton", "<= 1.5", [r["mamba_ssm_over_triton"] for r in small
                                                         if "mamba_ssm_over_triton" in r], max, lambda v: v <= 1.5)
    target("reduced_realised_flops_fraction_triton", ">= 0.85", [r["triton"]["realised"] for r in rows
                                                                 if "triton" in r], min, lambda v: v >= 0.85)
    peak = res.get("retrain", {}).get("triton/none", {}).get("peak_allocated_gb")
    target("retrain_vim_small_b128_bf16_peak_gb", "<= 40", [peak] if peak is not None else [], max, lambda v: v <= 40)
    if res["environment"]["mode"] != "gpu":
        out["note"] = "dry run: tiny models on CPU in Triton's interpreter; no timing here means anything"
    return out


def environment(plan):
    env = {"mode": "dry-run-cpu" if plan.dry else "gpu", "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": sys.version.split()[0], "started": datetime.datetime.now().isoformat(timespec="seconds")}
    for pkg in ("triton", "mamba_ssm"):
        try:
            env[pkg] = getattr(__import__(pkg), "__version__", "unknown")
        except Exception:  # absent, or a build whose extension does not load
            env[pkg] = None
    if plan.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, capability=f"{p.major}.{p.minor}", memory_gb=round(p.total_memory / 2**30, 1),
                   multiprocessors=p.multi_processor_count)
    else:
        env["device"] = "cpu (Triton interpreter)"
    return env


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run_cpu:
        # Before the kernels first load (they load on first use): this script's process, not the library's.
        os.environ["TRITON_INTERPRET"] = "1"
    if not args.dry_run_cpu and not torch.cuda.is_available():
        print(NO_CUDA)
        return 0
    plan, budget = Plan(args.dry_run_cpu), Budget(args.budget_s)
    if plan.dry:
        torch.set_num_threads(1)
    usable = backends(plan)
    res = {"script": "benchmarks/gpu.py", "environment": environment(plan), "budget_s": args.budget_s,
           "backends": {k: (v or "usable") for k, v in usable.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def run(name, fn):
        t0 = time.perf_counter()
        try:
            res[name] = fn()
        except Exception as exc:  # one broken section must not lose the others' numbers
            res[name] = {"error": f"{type(exc).__name__}: {exc}"[:500], "traceback": traceback.format_exc()[-3000:]}
        if isinstance(res[name], dict):
            res[name]["seconds"] = round(time.perf_counter() - t0, 1)
        res["elapsed_s"] = budget.elapsed()
        write_json(args.out, res)
        print(f"gpu.py: {name} done at {budget.elapsed()} s", flush=True)

    run("golden", lambda: section_golden(plan, usable, budget))
    best = {}

    def sweep():
        r, b = section_sweep(plan, usable, budget, not (args.no_tune or plan.dry))
        best.update(b or {})
        return r
    # The dry run runs its models on the chunked forward kernel: the one-position-per-step kernel costs
    # ~20 ms of Python per position in the interpreter (the unit tests cover both kernels).
    with kernel_config(**({"fwd_kernel": "chunked"} if plan.dry else {})):
        run("kernel_check", lambda: section_kernel_check(plan, usable, budget))
        run("sweep", sweep)
        with kernel_config(**best):
            run("retrain", lambda: section_retrain(plan, usable, budget))
            run("throughput", lambda: section_throughput(plan, usable, budget))
            run("profile", lambda: section_profile(plan, usable, budget))
    run("targets", lambda: targets(res))
    print(f"gpu.py: wrote {args.out} ({budget.elapsed()} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
