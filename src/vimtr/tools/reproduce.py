"""``vimtr reproduce TABLE``: one command per paper table; every row on your checkpoints and data, resumable,
the published numbers beside the measured ones.

The tables are data (:mod:`vimtr.tools.tables`, ``assets/tables/*.toml``). A run:

1. checks before anything slow: the table's definition, every selected row's checkpoint file (the official
   file name, looked up in ``--checkpoints``), re-trained checkpoints (``--retrained``, else ``--run-recipe``),
   the data; every problem is reported at once, with the file name expected, and no row runs;
2. runs the rows not finished yet: each row loads its checkpoint (a backbone's is loaded once for all its
   rows), applies its reduction, evaluates (:func:`vimtr.engine.evaluate.evaluate`, exact under torchrun) and
   writes ``OUT/TABLE/rows/ROW.json`` atomically. A row file whose definition and data match is kept: a
   killed run re-run skips the finished rows;
3. writes ``OUT/TABLE/table.{csv,json,md}`` (published, measured and the difference per row) and prints it.
"""
from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import time
from pathlib import Path

from vimtr.engine import common
from vimtr.errors import UsageError
from vimtr.io import atomic_write, write_json
from vimtr.tools import tables as T

# The views the published video numbers were measured with (VideoMamba's K400 test: 4 clips x 3 crops).
VIDEO_TEST_VIEWS = "4x3"


# ---------------------------------------------------------------------------------------------- data
def open_dataset(kind: str, root, model, on_corrupt: str = "skip"):
    """The evaluation split a table's rows run on, prepared for ``model``."""
    from vimtr.data import folders as data

    if kind == "digits":
        return data.load_dataset(data.DIGITS, "val")
    if kind in T.VIDEO_KINDS:  # an annotation list or a Kinetics-layout folder, at the model's frames and size
        from vimtr.data import video

        frames, size = video.model_geometry(model)
        dataset = video.load_video_dataset(root, "val", num_frames=frames, size=size,
                                           views=video.Views.parse(VIDEO_TEST_VIEWS), on_corrupt=on_corrupt)
        video.check_video_data(model, dataset)
        return dataset
    from vimtr.data import eval_transform

    dataset = data.load_dataset(root, "val", transform=eval_transform(model), on_corrupt=on_corrupt)
    data.check_classes(model, dataset)
    data.check_image_model(model, dataset)
    return dataset


# ---------------------------------------------------------------------------------------------- checks
def retrained_path(row: T.Row, retrained_dir: Path, out_dir: Path) -> Path | None:
    """The re-trained checkpoint of ``row``: ``RETRAINED/FOLDER`` (a file, or a folder holding ``best.pt`` or a
    single checkpoint file, as the released folders), else a finished recipe run in ``OUT``; None if absent."""
    candidates = [retrained_dir / row.retrained["folder"], recipe_dir(row, out_dir)]
    for base in candidates:
        if base.is_file():
            return base
        if base.is_dir():
            if (base / "best.pt").is_file():
                return base / "best.pt"
            files = sorted(p for p in base.iterdir() if p.is_file() and p.name.endswith(T.CHECKPOINT_SUFFIXES)
                           and p.name != "last.pt")
            if len(files) == 1:
                return files[0]
    return None


def recipe_dir(row: T.Row, out_dir: Path) -> Path:
    return out_dir / "retrain" / row.id


def preflight(table: T.Table, rows: list, args) -> list[str]:
    """Every reason the selected rows cannot run, found without running any (files, data, video support)."""
    problems = []
    ckpt_dir = Path(args.checkpoints).expanduser()
    if not ckpt_dir.is_dir():
        problems.append(f"--checkpoints {args.checkpoints}: no such folder")
    if table.data == "imagenet":
        if not args.data:
            problems.append(f"table {table.name} evaluates on ImageNet-1k val: give --data DIR (the folder holding "
                            "val/, or val/ itself)")
        elif not Path(args.data).expanduser().is_dir():
            problems.append(f"--data {args.data}: no such folder")
    elif table.video:
        if not args.data:
            problems.append(f"table {table.name} evaluates on {table.data} clips: give --data LIST|DIR (VideoMamba's "
                            "annotation list, e.g. val.csv, or a Kinetics-layout folder of videos)")
        elif not Path(args.data).expanduser().exists():
            problems.append(f"--data {args.data}: no such file or folder")
    missing = {}  # (expected file, hint) -> row ids
    retrained_dir = Path(args.retrained or args.checkpoints).expanduser()
    for row in rows:
        if row.retrained:
            if retrained_path(row, retrained_dir, out_root(args, table)):
                continue
            if not args.run_recipe:
                hint = ("a file, or a folder holding one checkpoint: the released re-trained model (Hugging Face "
                        "Soptq/R-Meeto) under --retrained, or add --run-recipe to re-train it")
                missing.setdefault((retrained_dir / row.retrained["folder"], hint), []).append(row.id)
                continue
            if table.video:
                problems.append(f"row {row.id}: re-training runs on images only; put the released checkpoint at "
                                f"{retrained_dir / row.retrained['folder']}")
            elif table.data == "imagenet" and args.data and not (Path(args.data).expanduser() / "train").is_dir():
                problems.append(f"row {row.id}: --run-recipe re-trains on DATA/train, and {args.data} has no train/ "
                                "folder (give the ImageNet root holding train/ and val/)")
        if ckpt_dir.is_dir() and not (ckpt_dir / row.backbone.checkpoint).is_file():
            hint = f"download: {row.backbone.download}" if row.backbone.download else ""
            missing.setdefault((ckpt_dir / row.backbone.checkpoint, hint), []).append(row.id)
    for (path, hint), ids in missing.items():
        problems.append(f"missing checkpoint {path} for row(s) {', '.join(ids)}" + (f" ({hint})" if hint else ""))
    return problems


# ---------------------------------------------------------------------------------------------- rows
def out_root(args, table: T.Table) -> Path:
    return Path(args.out).expanduser() / table.name


def fingerprint(row: T.Row, table: T.Table, args) -> dict:
    """What a finished row file must match to be reused: the row's definition and the data it saw."""
    data = "digits" if table.data == "digits" else str(Path(args.data).expanduser().resolve())
    return {"row": row.spec(), "data": data, "limit": args.limit, "amp": args.amp}


def finished(path: Path, fp: dict) -> dict | None:
    import json

    try:
        record = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    return record if record.get("fingerprint") == fp else None


class Models:
    """Loads each checkpoint once (rows are run grouped by checkpoint), on CPU until ``evaluate`` moves it."""

    def __init__(self):
        self.key, self.model, self.notes = None, None, []

    def get(self, path: Path, name: str, ema: bool, overrides: dict):
        from vimtr.loading import CheckpointError, load_model

        key = (str(path), name, ema, tuple(sorted(overrides.items())))
        if key != self.key:
            self.model, self.key, self.notes = None, None, []
            try:
                self.model = load_model(path, name=name, use_ema=ema, **overrides)
            except CheckpointError as e:
                if not (ema and "model_ema" in str(e)):
                    raise UsageError(f"{path}: {e}") from None
                # A re-trained release without EMA weights: evaluate its plain weights, and say so.
                self.model = load_model(path, name=name, use_ema=False, **overrides)
                self.notes = ["no model_ema weights in the checkpoint: evaluated its plain weights"]
            self.key = key
        return self.model


def evaluate_row(row: T.Row, model, dataset, args, ctx) -> dict:
    """Apply the row's reduction to ``model`` and evaluate it; the row's result (not yet written)."""
    import vimtr
    from vimtr.engine.evaluate import evaluate

    vimtr.restore(model)
    if row.method:
        try:
            vimtr.reduce(model, row.method, **row.params)
        except (TypeError, ValueError) as e:
            raise UsageError(f"row {row.id}: {row.method} with {row.params}: {e}") from None
    res = evaluate(model, dataset, batch_size=args.batch_size, device=ctx.device,
                   amp=common.amp_dtype(args.amp, ctx.device), progress=not args.no_progress,
                   workers=args.workers, desc=row.id, config={"command": "reproduce", "row": row.id})
    keep = ("top1", "top5", "loss", "gflops", "gflops_rmeeto", "params", "tokens_per_block", "corrupt", "skipped",
            "wall_s", "world_size", "protocol")
    # Video results count clips (clips, clips_per_s); the table's columns count samples either way.
    samples = "clips" if "clips" in res else "images"
    return {**{k: res[k] for k in keep if k in res}, "images": res[samples], "images_per_s": res[f"{samples}_per_s"],
            "reduction": res["config"].get("reduction")}


def run_recipe(row: T.Row, table: T.Table, args, ctx) -> Path:
    """Re-train ``row`` with vimtr's R-MeeTo recipe into ``OUT/TABLE/retrain/ROW`` (resumable); its best.pt."""
    from vimtr.engine import train

    out = recipe_dir(row, out_root(args, table))
    world_batch = args.retrain_batch_size * ctx.world
    argv = ["retrain", "--checkpoint", str(Path(args.checkpoints).expanduser() / row.backbone.checkpoint),
            "--model", row.backbone.model, "--method", row.method, "--epochs", str(row.retrained["epochs"]),
            "--data", "digits" if table.data == "digits" else str(Path(args.data).expanduser()),
            "--output", str(out), "--resume", "--batch-size", str(args.retrain_batch_size),
            "--accum-steps", str(max(1, 512 // world_batch)), "--device", str(args.device),
            "--workers", str(args.workers)]
    for key, value in row.params.items():
        argv += ["--num-prune", str(value)] if key == "r" else ["--param", f"{key}={value}"]
    if row.retrained.get("model_ema"):
        argv.append("--model-ema")
    argv += T.recipe_argv(row.retrained.get("recipe", {}))
    if args.no_progress:
        argv.append("--no-progress")
    parser = argparse.ArgumentParser(prog="vimtr")
    train.add_cli(parser.add_subparsers(dest="command", required=True))
    train._run(parser.parse_args(argv), ctx)  # within this run's process group (execute() would tear it down)
    return out / "best.pt"


def select_rows(table: T.Table, patterns) -> list:
    if not patterns:
        return list(table.rows)
    rows = [r for r in table.rows if any(fnmatch.fnmatchcase(r.id, p) for p in patterns)]
    if not rows:
        raise UsageError(f"--rows {' '.join(patterns)} matches no row of {table.name}; rows: "
                         f"{', '.join(r.id for r in table.rows)}")
    return rows


def run_table(table: T.Table, args, ctx) -> dict:
    """Check, run the unfinished rows, assemble the table (rank 0 writes); returns the assembled table."""
    rows = select_rows(table, args.rows)
    problems = preflight(table, rows, args)
    if problems:
        raise UsageError(f"table {table.name}: {len(problems)} problem(s), no row was run:\n  - "
                         + "\n  - ".join(problems))
    root = out_root(args, table)
    todo = [r for r in rows if not finished(root / "rows" / f"{r.id}.json", fingerprint(r, table, args))]
    todo = _agree(todo, ctx)
    if ctx.is_main:
        print(f"vimtr reproduce {table.name}: {len(rows) - len(todo)} of {len(rows)} row(s) already done, "
              f"{len(todo)} to run", flush=True)
    ckpt_dir = Path(args.checkpoints).expanduser()
    retrained_dir = Path(args.retrained or args.checkpoints).expanduser()
    models, datasets = Models(), {}
    order = sorted(todo, key=lambda r: (r.retrained is not None, r.backbone.key, r.retrained and r.id or ""))
    for row in order:
        start = time.time()
        if row.retrained:
            path = retrained_path(row, retrained_dir, root) or run_recipe(row, table, args, ctx)
            ema = bool(row.retrained.get("model_ema"))
        else:
            path, ema = ckpt_dir / row.backbone.checkpoint, row.backbone.ema
        model = models.get(path, row.backbone.model, ema, row.backbone.overrides)
        key = (table.data, tuple(model.input_size))
        if key not in datasets:
            datasets[key] = _limited(open_dataset(table.data, args.data, model, args.on_corrupt), args.limit)
        result = evaluate_row(row, model, datasets[key], args, ctx)
        if ctx.is_main:
            write_json(root / "rows" / f"{row.id}.json", {
                "table": table.name, "id": row.id, "fingerprint": fingerprint(row, table, args),
                "checkpoint_path": str(path), "ema": ema and not models.notes, "notes": list(models.notes),
                "result": result, "seconds": time.time() - start, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")})
            print(f"  {row.id}: top-1 {100 * result['top1']:.2f} %  ({time.time() - start:.0f} s)", flush=True)
    assembled = assemble(table, args)
    if ctx.is_main:
        write_outputs(assembled, root)
        print(markdown(assembled), flush=True)
    return assembled


def _agree(todo: list, ctx) -> list:
    """Under torchrun every rank runs the rows rank 0 found unfinished (its view of OUT decides)."""
    if not ctx.distributed:
        return todo
    import torch.distributed as dist

    ids = [[r.id for r in todo]]
    dist.broadcast_object_list(ids, src=0)
    wanted = set(ids[0])
    return [r for r in todo if r.id in wanted]


def _limited(dataset, limit):
    if not limit:
        return dataset
    from torch.utils.data import Subset

    return Subset(dataset, range(min(limit, len(dataset))))


# ---------------------------------------------------------------------------------------------- the table
COLUMNS = ("row", "backbone", "setting", "kind", "published_top1", "measured_top1", "diff_top1", "published_drop",
           "measured_drop", "diff_drop", "published_gflops", "measured_gflops", "flops_saved", "images", "status",
           "source", "note")


def assemble(table: T.Table, args) -> dict:
    """Published and measured side by side for every row of the table (finished ones measured)."""
    import json

    root = out_root(args, table)
    measured = {}
    for row in table.rows:
        rec = finished(root / "rows" / f"{row.id}.json", fingerprint(row, table, args))
        if rec:
            measured[row.id] = rec
    gkey = "gflops_rmeeto" if table.gflops_convention == "rmeeto" else "gflops"
    baselines = {r.backbone.key: r.id for r in reversed(table.rows) if r.method is None}
    out = []
    for row in table.rows:
        pub, rec = row.published, measured.get(row.id)
        res = rec["result"] if rec else None
        base = measured.get(baselines.get(row.backbone.key, ""), {}).get("result")
        top1 = 100 * res["top1"] if res else None
        drop = top1 - 100 * base["top1"] if res and base and row.method else None
        pub_drop = pub.get("drop")
        if pub_drop is None and row.method and "top1" in pub:  # a published baseline makes a published drop
            base_pub = table.row(baselines[row.backbone.key]).published.get("top1") if row.backbone.key in \
                baselines else None
            pub_drop = None if base_pub is None else pub["top1"] - base_pub
        out.append({
            "row": row.id, "backbone": row.backbone.label, "setting": row.setting(), "kind": row.kind,
            "published_top1": pub.get("top1"), "measured_top1": top1,
            "diff_top1": None if top1 is None or pub.get("top1") is None else top1 - pub["top1"],
            "published_drop": pub_drop, "measured_drop": drop,
            "diff_drop": None if drop is None or pub_drop is None else drop - pub_drop,
            "published_gflops": pub.get("gflops"), "measured_gflops": res[gkey] if res else None,
            "flops_saved": (1 - res["gflops"] / base["gflops"]) if res and base else None,
            "images": res["images"] if res else None, "status": pub.get("status", "not recovered"),
            "source": pub.get("source", ""), "note": "; ".join(filter(None, [pub.get("note", "")] +
                                                                       (rec or {}).get("notes", [])))})
    return {"table": table.name, "title": table.title, "paper": table.paper, "gflops_convention": gkey,
            "limit": args.limit, "notes": table.notes, "rows": out,
            "definition": json.loads(json.dumps([r.spec() for r in table.rows]))}


def _fmt(v, digits=2, sign=False):
    if v is None:
        return ""
    return f"{v:+.{digits}f}" if sign else f"{v:.{digits}f}"


def markdown(t: dict) -> str:
    head = ["row", "setting", "top-1 published", "top-1 measured", "Δ", "drop published", "drop measured", "Δ",
            f"GFLOPs ({t['gflops_convention']}) pub / meas", "status", "source"]
    lines = [f"### {t['title']}", ""] + ([f"Paper: {t['paper']}", ""] if t["paper"] else []) + [
        "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in t["rows"]:
        gf = "" if r["measured_gflops"] is None and r["published_gflops"] is None else \
            f"{_fmt(r['published_gflops']) or '–'} / {_fmt(r['measured_gflops']) or '–'}"
        status = r["status"] + (f" ({r['note']})" if r["note"] else "")
        lines.append("| " + " | ".join([
            r["row"], r["setting"], _fmt(r["published_top1"], 1), _fmt(r["measured_top1"]),
            _fmt(r["diff_top1"], 2, True), _fmt(r["published_drop"], 1, True), _fmt(r["measured_drop"], 2, True),
            _fmt(r["diff_drop"], 2, True), gf, status, r["source"]]) + " |")
    if t["limit"]:
        lines += ["", f"Measured on the first {t['limit']} images only (--limit): a smoke test, not the protocol."]
    if t["notes"]:
        lines += [""] + [f"- {n}" for n in t["notes"]]
    return "\n".join(lines)


def write_outputs(t: dict, root: Path):
    write_json(root / "table.json", t)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    for r in t["rows"]:
        w.writerow({k: ("" if r[k] is None else r[k]) for k in COLUMNS})
    atomic_write(root / "table.csv", lambda f: f.write(buf.getvalue().encode()))
    atomic_write(root / "table.md", lambda f: f.write((markdown(t) + "\n").encode()))


# ---------------------------------------------------------------------------------------------- CLI
EPILOG = """\
examples:
  vimtr reproduce --list
  vimtr reproduce mtr-main --check                      # validate the definition, no data needed
  vimtr reproduce mtr-main --data /data/imagenet --checkpoints ~/ckpt --out runs/reproduce
  vimtr reproduce rmeeto-main --data /data/imagenet --checkpoints ~/ckpt --retrained ~/ckpt/R-Meeto
  vimtr reproduce rmeeto-main --data /data/imagenet --checkpoints ~/ckpt --run-recipe --rows 'vim_s-*'
  torchrun --nproc_per_node 8 -m vimtr reproduce mtr-main --data /data/imagenet --checkpoints ~/ckpt

--checkpoints holds the official files under their release names (vim_s_midclstok_80p5acc.pth, ...);
a missing one is reported, with its name and download address, before any row runs. Re-run the same
command after a failure or a kill: finished rows (OUT/TABLE/rows/*.json) are kept. TABLE may also be
the path of your own .toml table (the format: vimtr/tools/tables.py).
"""


def add_cli(subparsers):
    p = subparsers.add_parser("reproduce", help="run a paper's table on your checkpoints and data",
                              description="Run every row of a paper's table (baselines, methods at FLOPs levels, "
                                          "ablations, re-trained models), resumably, and print the published "
                                          "numbers beside the measured ones.",
                              epilog=EPILOG, formatter_class=common.HelpFormatter)
    p.add_argument("table", nargs="?", metavar="TABLE", help="a table name (--list) or a .toml table file")
    p.add_argument("--list", action="store_true", help="list the tables and exit")
    p.add_argument("--check", action="store_true", help="validate the table's definition (no data) and exit")
    g = p.add_argument_group("inputs and outputs")
    g.add_argument("--data", metavar="DIR", help="ImageNet root holding val/ (and train/ for --run-recipe), or val/; "
                   "for video tables an annotation list or a Kinetics-layout folder (evaluated with 4x3 views)")
    g.add_argument("--checkpoints", metavar="DIR", help="folder with the official checkpoints, release names")
    g.add_argument("--retrained", metavar="DIR", help="folder with released re-trained checkpoints (default: "
                                                      "--checkpoints)")
    g.add_argument("--out", default="reproduce_out", metavar="DIR", help="results: OUT/TABLE/rows/*.json, "
                                                                         "OUT/TABLE/table.{csv,json,md}")
    g.add_argument("--rows", nargs="+", metavar="PATTERN", help="run only these row ids (shell patterns)")
    g.add_argument("--limit", type=int, metavar="N", help="evaluate the first N images only (a smoke test)")
    g = p.add_argument_group("evaluation and re-training")
    g.add_argument("--batch-size", type=int, default=128, help="evaluation batch per process")
    g.add_argument("--amp", choices=("bf16", "fp16"), help="autocast on GPU (default fp32, as the papers)")
    g.add_argument("--run-recipe", action="store_true",
                   help="re-train rows whose re-trained checkpoint is missing (vimtr retrain, resumable)")
    g.add_argument("--retrain-batch-size", type=int, default=128,
                   help="per process; accumulation keeps the recipe's global batch of 512")
    common.add_runtime_args(p, workers=4)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    """The ``vimtr reproduce`` command: 0 on success (bad input exits with a clear message)."""
    if args.list:
        print(list_tables())
        return 0
    with common.cli_errors("reproduce"):
        if not args.table:
            raise UsageError("name a table (vimtr reproduce --list shows them) or give a .toml table file")
        table = T.load_table(args.table)
        if args.check:
            problems = T.validate(table)
            if problems:
                raise UsageError(f"table {table.name}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
            print(f"table {table.name}: {len(table.rows)} rows, definition sound")
            return 0
        if not args.checkpoints:
            raise UsageError("give --checkpoints DIR (the official checkpoint files under their release names)")
        common.check_batch_size(args.batch_size)
        if args.limit is not None and args.limit < 1:
            raise UsageError(f"--limit must be a positive number of images, got {args.limit}")
    common.execute("reproduce", lambda a, ctx: run_table(table, a, ctx), args)
    return 0


def list_tables() -> str:
    lines = []
    for name, path in T.available().items():
        t = T.load_table(path)
        kinds = sorted({r.kind for r in t.rows})
        lines.append(f"{name:<16} {len(t.rows):>3} rows ({', '.join(kinds)})\n{'':<17}{t.title}")
    return "\n".join(lines)


if __name__ == "__main__":
    common.main_entry(add_cli, "reproduce")
