"""What a re-training run reports: the JSON-lines log (and TensorBoard scalars), one line per evaluation on
the console, and the closing summary (for :mod:`vimtr.engine.train`)."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

from vimtr.engine import checkpoints, common


class Writer:
    """JSON lines per evaluation (and TensorBoard scalars if asked and installed), rank 0 only."""

    def __init__(self, out_dir: Path | None, tensorboard: bool):
        self.path = out_dir / "log.jsonl" if out_dir else None
        self.tb = None
        if tensorboard and out_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                warnings.warn("tensorboard is not installed (pip install tensorboard); logging JSON lines only")

    def rewrite(self, history: list[dict]):
        """Start the log afresh; on resume it is rebuilt from the checkpoint, dropping lines written after it."""
        if self.path:
            text = "".join(json.dumps(common.jsonable(h)) + "\n" for h in history)
            checkpoints.atomic_write(self.path, lambda f: f.write(text.encode()))

    def add(self, entry: dict):
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(common.jsonable(entry)) + "\n")
        if self.tb:
            for k, v in entry.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(k, v, entry.get("step", 0))
            self.tb.flush()

    def close(self):
        if self.tb:
            self.tb.close()


def describe_entry(e: dict) -> str:
    parts = [f"epoch {e['epoch']:g}", f"step {e['step']}"]
    if e.get("train_loss") is not None:
        parts.append(f"loss {e['train_loss']:.4f}")
    if e.get("top1") is not None:
        parts.append(f"top-1 {100 * e['top1']:.2f}%")
    if e.get("ema_top1") is not None:
        parts.append(f"EMA top-1 {100 * e['ema_top1']:.2f}%")
    if e.get("reference_top1") is not None:
        parts.append(f"unreduced {100 * e['reference_top1']:.2f}%")
    if e.get("lr") is not None:
        parts.append(f"lr {e['lr']:.2e}")
    if e.get("images_per_s"):
        parts.append(f"{e['images_per_s']:.0f} img/s")
    parts.append(f"{e.get('minutes', 0):.2f} min")
    if e.get("recovered_minutes") is not None:
        parts.append(f"recovered after {e['recovered_minutes']:.2f} train-min")
    return "  ".join(parts)


def describe_summary(s: dict) -> str:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.2f} %"
    lines = [f"steps            {s['steps']} in {s['train_minutes']:.2f} train-min ({s['minutes']:.2f} min total)",
             f"unreduced top-1  {pct(s['reference_top1'])}",
             f"training-free    {pct(s['training_free_top1'])}",
             f"final top-1      {pct(s['final']['top1'] if s['final'] else None)}",
             f"best top-1       {pct(s['best_top1'])}"]
    if s["recover_within"] is not None:
        got = (f"{s['recovered_minutes']:.2f} train-min (step {s['recovered_step']})"
               if s["recovered_minutes"] is not None else "not reached")
        lines.append(f"within {s['recover_within']:g} pt   {got}")
    lines.append(f"checkpoint       {s['checkpoint']}")
    return "\n".join(lines)
