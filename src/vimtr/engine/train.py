"""Re-training a token-reduced model (the R-MeeTo recipe, cleanly): ``retrain(...)`` and ``vimtr retrain``.

Student: the reduced model. Teacher: the same weights unreduced, frozen, in eval mode. Loss:
``ce_weight · CE(student, targets) + distill_weight · KL(teacher ‖ student)`` on logits (soft-target CE
after mixup/cutmix, label-smoothed CE otherwise). AdamW without decay on norms, biases, position and
class embeddings; per-step cosine schedule (optional warm-up); one optimizer step per effective batch
(``batch_size × world × accum_steps``); optional EMA and gradient clipping; bf16 autocast on GPU.
The pieces are in :mod:`vimtr.engine.recipe`; this module is the loop and the CLI.

Checkpoints (``OUTPUT/last.pt``, ``OUTPUT/best.pt``) hold everything needed to continue bit for bit
(:mod:`vimtr.engine.checkpoints`). A run resumed from a mid-epoch checkpoint replays the rest of the
epoch in the same order with the same augmentations (:class:`vimtr.data.folders.EpochSampler`).
Where the official script differs (three optimizer steps per two batches, a teacher in train mode, ...)
see docs/engines.md.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader

import vimtr
from vimtr.data import folders as data
from vimtr.progress import progress_bar
from vimtr.engine import checkpoints, common, distributed, recipe
from vimtr.engine import settings as settings_mod
from vimtr.engine.settings import RESUME_KEYS, Settings
from vimtr.engine.train_log import Writer, describe_entry, describe_summary
from vimtr.errors import UsageError
from vimtr.engine.evaluate import evaluate

# ---------------------------------------------------------------------------------------------- the API
def retrain(student, train_set, *, teacher=None, val_set=None, settings: Settings | None = None, device="cpu",
            amp=None, ema_init: dict | None = None, out_dir=None, resume=None, reference_top1: float | None = None,
            tensorboard: bool = False, progress: bool = True, log=print, run_config: dict | None = None,
            view_average: str = "softmax", **hyperparameters) -> dict:
    """Re-train ``student`` (a reduced vimtr model, trained in place) on ``train_set``; returns a summary.

    ``train_set`` yields ``(image, label)``: tensors the model takes as they are, or PIL images
    (``augment=True``: DeiT augmentation; otherwise the official eval preprocessing). ``val_set`` yields
    ready tensors. A video dataset (:func:`vimtr.data.video.load_video_dataset`) samples and augments its own
    clips for training (VideoMamba's recipe: ``augment``, ``auto_augment``, ``reprob``; ``num_sample`` clips
    per video and visit); a video ``val_set`` may give several views per clip, combined by ``view_average``. ``teacher=None`` distils from the student's own weights unreduced (taken now); pass
    ``distill_weight=0`` to train on the labels only. ``lr=None`` means ``base_lr × global batch / 512``.
    ``ema_decay``: keep an EMA of the weights, started from ``ema_init`` (a state dict, e.g. the official
    checkpoint's ``model_ema``) or the student; with an EMA, "best" and the recovery time follow the EMA's
    accuracy, the model the official Vim-B recipe reports. ``amp``: None or an autocast dtype.
    Hyperparameters (``epochs``, ``batch_size``, ``lr``, ``distill_weight``, ...) are the fields of
    :class:`vimtr.engine.settings.Settings`, given as keywords or as ``settings=`` (keywords win).
    ``drop_path``: set the student's top stochastic-depth rate for training (``set_drop_path``); None keeps
    the model's own (0.1 for the registry's Vims, as R-MeeTo leaves it).
    ``out_dir``: write ``last.pt``/``best.pt``/``log.jsonl``/``results.json``; ``resume``: a checkpoint
    (``last.pt``) to continue from. ``recover_within`` (points of top-1): report the training minutes
    until the student is that close to the unreduced model (``reference_top1``, else measured on
    ``val_set``). Under torchrun (process group initialised) the model is wrapped in DDP.

    Returns ``{"history", "reference_top1", "training_free_top1", "final", "best_top1", "recover_within",
    "recovered_minutes", "recovered_step", "steps", "train_minutes", "minutes", "corrupt", "checkpoint",
    "config"}``.
    """
    settings = Settings.of(settings, **hyperparameters)
    trainer = Trainer(student, train_set, settings, teacher=teacher, val_set=val_set, device=device, amp=amp,
                      ema_init=ema_init, out_dir=out_dir, reference_top1=reference_top1, tensorboard=tensorboard,
                      progress=progress, log=log, run_config=run_config, view_average=view_average)
    if resume is not None:
        trainer.resume(resume)
    else:
        trainer.start()
    return trainer.fit()


# ---------------------------------------------------------------------------------------------- the loop
class Trainer:
    """One re-training run. ``state`` holds all progress; it goes into every checkpoint."""

    def __init__(self, student, train_set, s: Settings, *, teacher=None, val_set=None, device="cpu", amp=None,
                 ema_init=None, out_dir=None, reference_top1=None, tensorboard=False, progress=True, log=print,
                 run_config=None, view_average="softmax"):
        s.check()
        self.view_average = view_average  # how a video validation set's views are combined
        self.s, self.val_set, self.amp, self.progress, self.log = s, val_set, amp, progress, log
        self.ctx = distributed.context(device)
        dev = self.dev = self.ctx.device
        self.net = net = common.unwrap(student)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.record = checkpoints.vimtr_record(net) if self.out_dir is not None else None

        # ---- data: an epoch's order depends on (seed, epoch) only; whole optimizer steps per epoch
        video = hasattr(train_set, "for_training")  # reads, samples and augments its clips itself
        if video:
            from vimtr.data.video_transforms import ClipAugment
            augment = ClipAugment(train_set.size, s.auto_augment, s.reprob) if s.augment else None
            train_set = train_set.for_training(augment=augment, num_sample=s.num_sample)
        elif s.num_sample != 1:
            raise UsageError(f"num_sample={s.num_sample} draws several clips per video: it applies to video datasets")
        train_subset = data.fraction_subset(train_set, s.train_fraction, s.seed)
        self.sampler = data.EpochSampler(len(train_subset), s.batch_size, rank=self.ctx.rank, world=self.ctx.world,
                                         seed=s.seed, repeats=s.repeated_aug)
        self.batches = self.sampler.batches = self.sampler.batches - self.sampler.batches % s.accum_steps
        if self.batches == 0:
            per = len(train_subset) // self.ctx.world
            raise UsageError(f"the training set has {len(train_subset)} images ({per} per process over "
                             f"{self.ctx.world}); one optimizer step needs batch_size × accum_steps = "
                             f"{s.batch_size * s.accum_steps} per process: lower the batch size or accum_steps")
        transform = (None if video else recipe.train_transform(net, s.auto_augment, s.color_jitter, s.reprob)
                     if s.augment else recipe.EvalIfImage(net))
        self.loader = DataLoader(data.SeededDataset(train_subset, transform), batch_size=s.batch_size,
                                 sampler=self.sampler, num_workers=data.loader_workers(train_subset, s.workers),
                                 collate_fn=data.collate_skip,
                                 pin_memory=dev.type == "cuda",
                                 generator=torch.Generator())  # iterator creation must not draw from the global RNG
        self.total_steps = self.batches // s.accum_steps * s.epochs
        warmup = s.warmup_steps + round(s.warmup_epochs * (self.batches // s.accum_steps))
        global_batch = s.batch_size * self.ctx.world * s.accum_steps
        self.lr = float(s.lr) if s.lr is not None else s.base_lr * global_batch / 512
        min_lr = min(s.min_lr, self.lr)
        self.config = {**asdict(s), "lr": self.lr, "min_lr": min_lr, "world_size": self.ctx.world,
                       "global_batch": global_batch, "train_size": len(train_subset), "device": str(dev),
                       "amp": None if amp is None else str(amp).replace("torch.", ""),
                       "steps_per_epoch": self.batches // s.accum_steps, "total_steps": self.total_steps,
                       "warmup_total_steps": warmup,
                       "model": self.record, **(run_config or {})}

        # ---- teacher: the original weights unreduced, taken before any training or resume
        if s.distill_weight > 0:
            # A teacher given by the caller is only put in eval mode: its forward runs under no_grad, and
            # freezing its parameters would also freeze the caller's model (and any copy made of it later).
            teacher = recipe.make_teacher(net) if teacher is None else common.unwrap(teacher).eval()
            if getattr(teacher, "num_classes", None) != getattr(net, "num_classes", None):
                raise UsageError(f"the teacher has {teacher.num_classes} classes, the student {net.num_classes}; "
                                 f"distil from a teacher with the same head")
            teacher.to(dev)
        self.teacher = teacher if s.distill_weight > 0 else None
        self.reference_model = self.teacher
        if self.reference_model is None and s.recover_within is not None and reference_top1 is None and val_set is not None:
            self.reference_model = recipe.make_teacher(net).to(dev)

        # ---- optimisation
        if s.drop_path is not None:
            if not hasattr(net, "set_drop_path"):
                raise UsageError(f"drop_path: {type(net).__name__} has no set_drop_path(); leave drop_path=None")
            net.set_drop_path(s.drop_path)
        net.to(dev).train()
        self.optimizer = recipe.adamw(net, self.lr, s.weight_decay)
        from timm.scheduler import CosineLRScheduler
        self.scheduler = CosineLRScheduler(self.optimizer, t_initial=max(1, self.total_steps - warmup),
                                           lr_min=min_lr, warmup_t=warmup, warmup_lr_init=min_lr,
                                           warmup_prefix=True, t_in_epochs=False)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)  # bf16 needs no scaling
        self.ema = None
        if s.ema_decay:
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(net, decay=s.ema_decay)
            if ema_init is not None:
                try:
                    self.ema.module.load_state_dict(ema_init)
                except RuntimeError as e:
                    raise UsageError(f"ema_init does not fit the model: {str(e).splitlines()[0]}") from None
        self.model = net
        if self.ctx.distributed:
            self.model = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=[dev.index] if dev.type == "cuda" else None)
        self.criterion, self.mixup = recipe.criterion_and_mixup(net.num_classes, s.mixup, s.cutmix,
                                                                s.label_smoothing)

        self.state = {"epoch": 0, "batch_in_epoch": 0, "step": 0, "history": [], "best_top1": None,
                      "reference_top1": reference_top1, "training_free_top1": None, "recovered_minutes": None,
                      "recovered_step": None, "train_seconds": 0.0, "wall_seconds": 0.0, "epoch_loss": 0.0,
                      "epoch_images": 0, "epoch_seconds": 0.0, "corrupt": 0}
        self.writer = Writer(self.out_dir if self.ctx.is_main else None, tensorboard)
        self.last_eval = {}  # step -> result: the final report reuses the end-of-training evaluation
        self.start_wall = time.perf_counter()

    # ------------------------------------------------------------------ starting
    def start(self):
        """A fresh run: seed, then measure the unreduced reference and the training-free accuracy."""
        st = self.state
        self.writer.rewrite([])
        checkpoints.seed_everything(self.s.seed + self.ctx.rank)
        if self.val_set is None:
            return
        if st["reference_top1"] is None and self.reference_model is not None:
            st["reference_top1"] = self._eval(self.reference_model, "reference (unreduced)")["top1"]
        if self.s.eval_before:
            before = self._eval(self.net, "training-free")
            st["training_free_top1"] = before["top1"]
            entry = {"epoch": 0, "step": 0, "top1": before["top1"], "top5": before["top5"], "val_loss": before["loss"],
                     "reference_top1": st["reference_top1"], "train_minutes": 0.0, "minutes": 0.0}
            self._record(entry)

    def resume(self, path):
        ckpt = checkpoints.load(path)
        _check_resume(ckpt, checkpoints.vimtr_record(self.net), self.config, path)
        self.net.load_state_dict(ckpt["model"])
        if self.ema is not None:
            self.ema.module.load_state_dict(ckpt["model_ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if "scaler" in ckpt:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.state.update(ckpt["train"]["state"])
        checkpoints.set_rng_state(ckpt["rng"][self.ctx.rank])
        self.writer.rewrite(self.state["history"])
        self.start_wall = time.perf_counter() - self.state["wall_seconds"]
        self._say(f"resumed {path}: epoch {self.state['epoch']}, batch {self.state['batch_in_epoch']} of "
                  f"{self.batches}, step {self.state['step']} of {self.total_steps}")

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        st, s = self.state, self.s
        for epoch in range(st["epoch"], s.epochs):
            self._train_epoch(epoch)
            stats = self._epoch_stats()
            st.update(epoch=epoch + 1, batch_in_epoch=0, epoch_loss=0.0, epoch_images=0, epoch_seconds=0.0)
            entry, best = self._evaluate()
            self._record({**(entry or {"epoch": epoch + 1, "step": st["step"]}), **stats}, save="best" if best else "last")
        final = None
        if self.val_set is not None:
            final = self.last_eval.get(st["step"]) or self._eval(self.net, "final")
        summary = {
            "history": st["history"], "reference_top1": st["reference_top1"],
            "training_free_top1": st["training_free_top1"], "final": final, "best_top1": st["best_top1"],
            "recover_within": s.recover_within, "recovered_minutes": st["recovered_minutes"],
            "recovered_step": st["recovered_step"], "steps": st["step"], "train_minutes": st["train_seconds"] / 60,
            "minutes": self._minutes(), "corrupt": int(distributed.all_reduce_sum([st["corrupt"]], self.ctx)[0]),
            "checkpoint": str(self.out_dir / "last.pt") if self.out_dir else None, "config": self.config,
        }
        if self.out_dir is not None and self.ctx.is_main:
            common.write_json(self.out_dir / "results.json", summary)
        self.writer.close()
        return summary

    def _train_epoch(self, epoch: int):
        st, s = self.state, self.s
        self.sampler.set_epoch(epoch, skip=st["batch_in_epoch"] * s.batch_size)
        self.model.train()
        bar = progress_bar(self.loader, desc=f"epoch {epoch + 1}/{s.epochs}", initial=st["batch_in_epoch"],
                           total=self.batches, enabled=self.progress and self.ctx.is_main)
        micro, tick = st["batch_in_epoch"], time.perf_counter()
        for batch in bar:
            micro += 1
            last_micro = micro % s.accum_steps == 0
            loss = self._forward_backward(batch, sync=last_micro)
            if not last_micro:
                continue
            self._optimizer_step()
            now = time.perf_counter()
            st["train_seconds"] += now - tick  # excludes the evaluations and checkpoints below
            st["epoch_seconds"] += now - tick
            st["batch_in_epoch"] = micro
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
            if micro < self.batches:  # mid-epoch evaluation / checkpoint (the epoch's end has its own)
                if s.eval_every_steps and st["step"] % s.eval_every_steps == 0:
                    entry, best = self._evaluate()
                    if entry is not None:
                        self._record({**entry, **self._epoch_stats()}, save="best" if best else None)
                if s.save_every_steps and st["step"] % s.save_every_steps == 0:
                    self._save("last")
            tick = time.perf_counter()
        bar.close()

    def _forward_backward(self, batch, sync: bool) -> float:
        st, s, dev = self.state, self.s, self.dev
        x, y, bad = data.unpack(batch)
        st["corrupt"] += len(bad)
        if x is None:
            raise UsageError(f"a whole batch of {s.batch_size} training images was unreadable (see the warnings); "
                             f"fix the data folder")
        if x.dim() == len(self.net.input_size) + 2:  # num_sample clips per video: all of them train
            x, y = x.flatten(0, 1), y.repeat_interleave(x.shape[1])
        if self.mixup is not None and len(x) % 2:  # a skipped image left an odd batch: mixup needs pairs
            x, y = x[:-1], y[:-1]
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        x, targets = recipe.mix(self.mixup, x, y)
        # Without sync, DDP keeps this micro-batch's gradients local until the step's last one.
        no_sync = self.model.no_sync() if self.ctx.distributed and not sync else contextlib.nullcontext()
        with no_sync:
            with common.autocast(dev, self.amp):
                logits = self.model(x).float()
                with torch.no_grad():
                    t_logits = self.teacher(x).float() if self.teacher is not None else None
                loss = recipe.training_loss(logits, targets, self.criterion, ce_weight=s.ce_weight,
                                            teacher_logits=t_logits, distill_weight=s.distill_weight,
                                            temperature=s.distill_temperature)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss.item()} at step {st['step']}; lower the learning "
                                         f"rate or clip gradients (--clip-grad)")
            self.scaler.scale(loss / s.accum_steps).backward()
        value = loss.item()
        st["epoch_loss"] += value * len(x)
        st["epoch_images"] += len(x)
        return value

    def _optimizer_step(self):
        if self.s.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.s.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.state["step"] += 1
        self.scheduler.step_update(num_updates=self.state["step"])
        if self.ema is not None:
            self.ema.update(self.net)  # constant decay (with step=, timm would copy the weights at step 1)

    # ------------------------------------------------------------------ evaluation, logs, checkpoints
    def _eval(self, model, desc):
        return evaluate(model, self.val_set, batch_size=self.s.eval_batch_size or self.s.batch_size, device=self.dev,
                        amp=self.amp, progress=self.progress, workers=self.s.workers, desc=desc,
                        view_average=self.view_average)

    def _evaluate(self):
        """Evaluate the student (and EMA); returns (history entry, is best) or (None, False) without val set."""
        if self.val_set is None:
            return None, False
        st = self.state
        result = self._eval(self.net, f"eval step {st['step']}")
        self.last_eval = {st["step"]: result}
        entry = {"epoch": st["epoch"] + st["batch_in_epoch"] / self.batches, "step": st["step"],
                 "top1": result["top1"], "top5": result["top5"], "val_loss": result["loss"]}
        top1 = result["top1"]
        if self.ema is not None:  # the EMA is the model the recipe reports
            entry["ema_top1"] = top1 = self._eval(self.ema.module, "eval EMA")["top1"]
        ref, within = st["reference_top1"], self.s.recover_within
        if within is not None and ref is not None and st["recovered_minutes"] is None and top1 >= ref - within / 100:
            st["recovered_minutes"], st["recovered_step"] = st["train_seconds"] / 60, st["step"]
        entry["recovered_minutes"] = st["recovered_minutes"]
        best = st["best_top1"] is None or top1 > st["best_top1"]
        if best:
            st["best_top1"] = top1
        return entry, best

    def _epoch_stats(self) -> dict:
        st = self.state
        loss, images = distributed.all_reduce_sum([st["epoch_loss"], st["epoch_images"]], self.ctx).tolist()
        return {"train_loss": loss / images if images else None, "lr": self.optimizer.param_groups[0]["lr"],
                "images_per_s": images / st["epoch_seconds"] if st["epoch_seconds"] else None,
                "train_minutes": st["train_seconds"] / 60}

    def _minutes(self) -> float:
        return (time.perf_counter() - self.start_wall) / 60

    def _record(self, entry: dict, save: str | None = None):
        """Append to the history (which checkpoints carry), checkpoint if asked, then log the line."""
        entry["minutes"] = self._minutes()
        self.state["history"].append(entry)
        if save:
            self._save(save)
        if self.ctx.is_main:
            self.writer.add(entry)
            self._say(describe_entry(entry))

    def _save(self, tag: str):
        """All ranks call this (their RNG states are gathered); rank 0 writes last.pt (and best.pt)."""
        self.state["wall_seconds"] = time.perf_counter() - self.start_wall
        rngs = distributed.all_gather(checkpoints.rng_state(), self.ctx)
        if self.out_dir is None or not self.ctx.is_main:
            return
        obj = {"vimtr": self.record, "model": checkpoints.state_dict(self.net),
               "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": rngs,
               "train": {"state": dict(self.state), "config": common.jsonable(self.config)}}
        if self.ema is not None:
            obj["model_ema"] = checkpoints.state_dict(self.ema.module)
        if self.scaler.is_enabled():
            obj["scaler"] = self.scaler.state_dict()
        checkpoints.save(obj, self.out_dir / "last.pt")
        if tag == "best":
            checkpoints.save(obj, self.out_dir / "best.pt")

    def _say(self, text: str):
        if self.ctx.is_main and self.log:
            self.log(text)


def _check_resume(ckpt: dict, record: dict, config: dict, path):
    """Refuse a checkpoint from another model, reduction or data/schedule setting, naming what differs."""
    theirs = ckpt.get("vimtr") or {}
    for key, what in (("model_name", "model"), ("config", "model configuration"), ("reduction", "token reduction")):
        if theirs.get(key) != record.get(key):
            raise UsageError(f"--resume {path}: the checkpoint was written with {what} {theirs.get(key)!r}, this run "
                             f"uses {record.get(key)!r}; resume with the same --model/--checkpoint/--method/--r/"
                             f"--param as the original run, or write a new run to another --output")
    old = (ckpt.get("train") or {}).get("config") or {}
    diff = [f"{k}: checkpoint {old.get(k)!r}, now {config.get(k)!r}" for k in RESUME_KEYS
            if k in old and common.jsonable(old.get(k)) != common.jsonable(config.get(k))]
    if diff:
        raise UsageError(f"--resume {path}: settings differ from the run that wrote it ({'; '.join(diff)}); the data "
                         f"order and schedule depend on them. Use the original settings, or start a new --output")


# ---------------------------------------------------------------------------------------------- CLI
EPILOG = """\
examples:
  # R-MeeTo main table, Vim-S: r=11, 15 epochs, lr 2e-5 per 512 images (4 GPUs x 128)
  # (under torchrun spell --r as --num-prune: torchrun's own parser rejects "--r")
  torchrun --nproc_per_node 4 -m vimtr retrain --checkpoint vim_s_midclstok_80p5acc.pth \\
      --method rmeeto --num-prune 11 --data /data/imagenet --epochs 15 --batch-size 128 --output runs/vim_s_r11
  # continue a killed run where it stopped
  torchrun --nproc_per_node 4 -m vimtr retrain --checkpoint vim_s_midclstok_80p5acc.pth \\
      --method rmeeto --num-prune 11 --data /data/imagenet --epochs 15 --batch-size 128 --output runs/vim_s_r11 --resume
  # R-MeeTo K400, VideoMamba-S: r=88, 8 frames, 15 epochs, 4 GPUs x 32 videos x 2 clips, accumulation 2
  # (docs/video.md: the whole recipe and what differs from the official script)
  torchrun --nproc_per_node 4 -m vimtr retrain --checkpoint videomamba_s16_k400_f8_res224.pth --method rmeeto \\
      --num-prune 88 --data k400/train.csv --val-data k400/val.csv --data-root k400/videos --num-frames 8 \\
      --epochs 15 --batch-size 32 --num-sample 2 --accum-steps 2 --lr 4e-5 --min-lr 2e-6 --warmup-epochs 5 \\
      --weight-decay 0.1 --aa rand-m5-n2-mstd0.25-inc1 --repeated-aug 1 --no-distill --amp bf16 \\
      --output runs/k400_s_r88
  # the built-in digits set on CPU, a few minutes
  vimtr retrain --model vim_digits --method rmeeto --r 8 --data digits --epochs 3 --batch-size 64 \\
      --lr 1e-3 --output runs/digits_r8

--data DIR holds train/ and val/ ImageFolders (ImageNet layout); --val-data overrides the latter. For a
video model --data is a training annotation list (--val-data the validation one) or a folder with train/
and val/ class folders of clips; --test-views sets the validation views (default 1x1).
Writes OUTPUT/last.pt (every epoch and every --save-every-steps steps), OUTPUT/best.pt, OUTPUT/log.jsonl
(one JSON line per evaluation: epoch, step, train_loss, lr, top1, top5, val_loss, ema_top1, images_per_s,
train_minutes, minutes, recovered_minutes) and OUTPUT/results.json. Checkpoints reload with
vimtr.load_model(path) / vimtr eval --checkpoint path, reduction included.
"""


def add_cli(subparsers):
    p = subparsers.add_parser("retrain", help="re-train a token-reduced model (R-MeeTo recipe)",
                              description="Re-train a token-reduced Vision Mamba with distillation from its "
                                          "unreduced self (R-MeeTo). Resumable, exact under torchrun.",
                              epilog=EPILOG, formatter_class=common.HelpFormatter)
    common.add_model_args(p)
    p.add_argument("--teacher", metavar="PATH", help="teacher weights (default: the --checkpoint unreduced)")
    common.add_reduction_args(p)
    g = p.add_argument_group("data and output")
    g.add_argument("--data", required=True, metavar="DIR|LIST|digits",
                   help="folder with train/ and val/, or digits; for a video model also a training annotation list")
    g.add_argument("--val-data", metavar="DIR|LIST", help="validation ImageFolder or video list/folder "
                                                          "(default: DATA/val)")
    g.add_argument("--output", required=True, metavar="DIR", help="checkpoints, logs and results go here")
    g.add_argument("--resume", nargs="?", const="auto", metavar="PATH",
                   help="continue from a checkpoint (no value: OUTPUT/last.pt if it exists, else start)")
    g.add_argument("--no-eval", action="store_true", help="no validation (and no recovery time)")
    g.add_argument("--tensorboard", action="store_true", help="also log to OUTPUT/tensorboard (if installed)")
    groups = settings_mod.add_cli(p, {"data": g})
    groups["optimisation"].add_argument(
        "--model-ema", action="store_true", help="keep an EMA of the weights, started from the checkpoint's "
        "model_ema if it has one (Vim-B recipe); best.pt and the recovery time then follow the EMA")
    groups["optimisation"].add_argument("--amp", choices=("auto", "bf16", "fp16", "none"), default="auto",
                                        help="autocast dtype (auto: bf16 on GPU, fp32 on CPU)")
    groups["distillation"].add_argument("--no-distill", action="store_true", help="train on the labels only")
    common.add_video_args(p, test_views=True)
    common.add_runtime_args(p, workers=8)
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    """The ``vimtr retrain`` command: 0 on success (bad input exits with a one-line message)."""
    execute(args)
    return 0


def execute(args) -> dict:
    """Run the command and return its results (rank 0 and the others alike)."""
    return common.execute("retrain", _run, args)


def _video_datasets(args, model):
    """(train, val or None) for a video model: --data a folder with train/ (and val/) class folders, or an
    annotation list (then --val-data names the validation list, or --no-eval)."""
    train = common.video_dataset(args, model, args.data, "train", views="1x1")
    if args.no_eval:
        return train, None
    root = Path(args.data).expanduser()
    if args.val_data:
        val_spec = args.val_data
    elif root.is_dir() and (root / "val").is_dir():
        val_spec = root / "val"
    else:
        raise UsageError(f"--data {args.data}: no validation clips; pass --val-data (a list such as val.csv, or a "
                         f"folder) or --no-eval")
    return train, common.video_dataset(args, model, val_spec, "val")


def _datasets(args, model):
    """(train, val or None) from --data/--val-data; folder train sets stay PIL for the augmentation."""
    if common.video_args_apply(args, model):
        return _video_datasets(args, model)
    if args.data == data.DIGITS:
        train = data.load_dataset(data.DIGITS, "train")
        val = None if args.no_eval else data.load_dataset(args.val_data or data.DIGITS, "val")
        return train, val
    root = Path(args.data).expanduser()
    if not (root / "train").is_dir():
        raise UsageError(f"--data {args.data}: expected {root / 'train'} (and val/) as ImageFolders, the ImageNet "
                         f"layout; {data.LAYOUT_HINT}")
    train = data.image_folder(root / "train", "train", on_corrupt=args.on_corrupt)
    val = None
    if not args.no_eval:
        val_root = Path(args.val_data).expanduser() if args.val_data else root / "val"
        if not args.val_data and not val_root.is_dir():
            raise UsageError(f"--data {args.data}: no val/ folder for evaluation; pass --val-data DIR or --no-eval")
        from vimtr.data import eval_transform
        val = data.image_folder(val_root, "val", transform=eval_transform(model), on_corrupt=args.on_corrupt)
    return train, val


def _official_ema(args):
    """The checkpoint's own ``model_ema`` weights to start the EMA from (as the official Vim-B recipe), if any."""
    if args.ema or not args.checkpoint:
        return None  # --ema: the student already starts from the EMA weights
    from vimtr.loading import CheckpointError, load_model
    try:
        return load_model(args.checkpoint, name=args.model, use_ema=True).state_dict()
    except CheckpointError:
        return None  # no model_ema in the file: the EMA starts from the student


def _run(args, ctx: distributed.Context):
    for flag, value in (("--batch-size", args.batch_size), ("--accum-steps", args.accum_steps),
                        ("--epochs", args.epochs)):
        common.check_batch_size(value, flag)  # before anything slow is loaded
    out = Path(args.output).expanduser()
    resume = None
    if args.resume == "auto":  # a job script may always pass --resume: the first attempt starts afresh
        resume = out / "last.pt" if (out / "last.pt").exists() else None
        if resume is None and ctx.is_main:
            print(f"--resume: no {out / 'last.pt'} yet, starting a new run", flush=True)
    elif args.resume:
        resume = Path(args.resume).expanduser()
    elif (out / "last.pt").exists():
        raise UsageError(f"--output {out} already holds a run ({out / 'last.pt'}); add --resume to continue it, or "
                         f"choose another --output")
    amp = common.amp_dtype(args.amp, ctx.device)
    model = common.load_from_args(args)
    teacher = None
    if args.teacher and not args.no_distill:
        from vimtr.loading import CheckpointError, load_model
        try:
            teacher = vimtr.restore(load_model(args.teacher))
        except CheckpointError as e:
            raise UsageError(f"--teacher: {e}") from None
    ema_init = _official_ema(args) if args.model_ema else None
    common.apply_reduction(model, common.reduction_spec(args))
    if getattr(model, "reduction", None) is None and ctx.is_main:
        warnings.warn("no token reduction (give --method ...): re-training the full model", stacklevel=1)
    train_set, val_set = _datasets(args, model)
    for ds, what in ((train_set, "training set"), (val_set, "validation set")):
        if ds is not None and not getattr(ds, "is_video", False):  # video sets were checked when built
            data.check_classes(model, ds, what)
            data.check_image_model(model, ds)
    run_config = {"command": "retrain", "checkpoint": args.checkpoint, "teacher": args.teacher,
                  "data": data.describe(train_set), "val_data": data.describe(val_set) if val_set else None}
    settings = settings_mod.from_args(
        args, distill_weight=0.0 if args.no_distill else args.distill_weight,
        ema_decay=args.ema_decay if args.model_ema else None, augment=args.augment and args.data != data.DIGITS,
        recover_within=None if args.no_eval else args.recover_within)
    if getattr(val_set, "is_video", False):
        run_config["val_protocol"] = {**val_set.protocol(), "view_average": args.view_average}
    summary = retrain(model, train_set, teacher=teacher, val_set=val_set, settings=settings, device=ctx.device, amp=amp,
                      ema_init=ema_init, out_dir=out, resume=resume, tensorboard=args.tensorboard,
                      progress=not args.no_progress, run_config=run_config, view_average=args.view_average)
    if ctx.is_main:
        print(describe_summary(summary), flush=True)
    return summary


if __name__ == "__main__":
    common.main_entry(add_cli, "retrain")
