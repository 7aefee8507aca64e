"""Does decoding keep the model fed? Decoded clips/s (loader workers) against the model's clips/s, one run.

    PYTHONPATH=src python benchmarks/video_decode.py [--clips 8] [--frames 250] [--workers 0 1 2]
        [--model videomamba_video_tiny] [--batch 2] [--data LIST]

Clips: ``--data`` (an annotation list) or, by default, ``--clips`` Kinetics-like clips written here with
PyAV (moving digits, ``--frames`` frames of ``--height`` × ``--width``, H.264: a K400 clip is ~250 frames of
a 256-340 px short side). For each ``--workers`` count the loader reads every clip (``--passes`` times) as
``vimtr eval`` does (decode → 8 sparse frames → resize → crop → normalise; one view) and as ``vimtr
retrain`` does (random segments + VideoMamba's augmentation); the model runs fp32 forwards of ``--batch``
random clips at its full size (1 + 8·196 tokens), unreduced and with R-MeeTo's K400 r=88.

Reported: ``clips_per_s`` per loader setting and model variant, and ``headroom`` = loader clips/s ÷ model
clips/s (> 1: decoding keeps up). On one machine the loader's workers and the model share the cores, so
the figures are ratios of this run, not a capacity plan. On a busy machine wall times mislead; the
CPU seconds per clip (in-process loader, one-thread model) and their ratio ``cpu_headroom`` do not. Writes JSON (default
benchmarks/results/video_decode.json).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scan import machine, write  # noqa: E402

import vimtr  # noqa: E402
from vimtr.data import video  # noqa: E402
from vimtr.data.folders import collate_skip  # noqa: E402
from vimtr.data.video_transforms import ClipAugment  # noqa: E402


def write_clips(root: Path, clips: int, frames: int, height: int, width: int) -> Path:
    from vimtr.data.synthetic_video import write_moving_digits
    info = write_moving_digits(root, classes=min(clips, 10), per_class=-(-clips // min(clips, 10)), frames=frames,
                               size=height, width=width, val_per_class=0)
    return info["train"]


def loader_rate(dataset, workers: int, batch: int, passes: int) -> dict:
    loader = DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=collate_skip,
                        persistent_workers=workers > 0)
    for _ in loader:  # warm-up pass: worker start-up, file cache
        break
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    for _ in range(passes):
        for x, _, _ in loader:
            n += 0 if x is None else x.shape[0]
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {"workers": workers, "clips": n, "wall_s": wall, "clips_per_s": n / wall}
    if workers == 0:  # all the work in this process: its CPU time per clip survives a busy machine
        out["cpu_s_per_clip"] = cpu / n
    return out


def model_rate(model, batch: int, reps: int) -> dict:
    x = torch.randn(batch, *model.input_size)
    with torch.inference_mode():
        model(x)  # warm-up (numba kernels compiled or loaded from cache)
        times, cpus = [], []
        for _ in range(reps):
            t0, c0 = time.perf_counter(), time.process_time()
            model(x)
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    best = min(times)
    return {"batch": batch, "wall_min_s": best, "clips_per_s": batch / best, "cpu_s_per_clip": min(cpus) / batch,
            "tokens": model.reducer.lengths[-1] if model.reducer else model.num_tokens}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", help="an annotation list of real clips (default: write synthetic ones)")
    p.add_argument("--clips", type=int, default=8)
    p.add_argument("--frames", type=int, default=250)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=340)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--model", default="videomamba_video_tiny")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the model (1: CPU time per clip "
                                                          "is then comparable with a loader process's)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/video_decode.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = vimtr.create_model(args.model).eval()
    frames, size = video.model_geometry(model)
    with tempfile.TemporaryDirectory() as tmp:
        lst = Path(args.data) if args.data else write_clips(Path(tmp), args.clips, args.frames, args.height, args.width)
        evalset = video.load_video_dataset(lst, num_frames=frames, size=size)
        trainset = evalset.for_training(augment=ClipAugment(size, "rand-m5-n2-mstd0.25-inc1", reprob=0.25))
        loaders = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for w in args.workers:
                for mode, ds in (("eval", evalset), ("train", trainset)):
                    r = loader_rate(ds, w, args.batch, args.passes)
                    r["mode"] = mode
                    loaders.append(r)
                    print(f"loader {mode:5s} workers={w}: {r['clips_per_s']:.2f} clips/s", flush=True)
    models = {}
    for label, reduce in (("unreduced", None), ("rmeeto_r88", {"r": 88})):
        if reduce:
            vimtr.reduce(model, "rmeeto", **reduce)
        models[label] = model_rate(model, args.batch, args.reps)
        print(f"model {label}: {models[label]['clips_per_s']:.2f} clips/s ({models[label]['tokens']} final tokens)",
              flush=True)
    for r in loaders:
        r["headroom"] = {k: r["clips_per_s"] / m["clips_per_s"] for k, m in models.items()}
        if "cpu_s_per_clip" in r:  # CPU seconds the model spends per clip, per CPU second of decoding
            r["cpu_headroom"] = {k: m["cpu_s_per_clip"] / r["cpu_s_per_clip"] for k, m in models.items()}
    result = {"benchmark": "video_decode", "model": args.model, "frames": frames, "size": size,
              "clips": {"source": str(args.data) if args.data else "synthetic moving digits (H.264)",
                        "count": len(evalset), "frames": None if args.data else args.frames,
                        "height": None if args.data else args.height, "width": None if args.data else args.width},
              "loaders": loaders, "models": models, "machine": machine()}
    path = write(result, args.out, "video_decode")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
