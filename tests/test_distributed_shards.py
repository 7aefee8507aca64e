"""Evaluation and re-training on shards of unequal size: exactly what one process computes, no sample twice.

``DistributedSampler`` pads every rank's share to the same length with duplicates, which changes counts
and metrics whenever the dataset does not divide by the number of processes; vimtr promises the totals of a
single process (vimtr.engine.distributed). Every run here has uneven shards: 23 items on 2 ranks (12 + 11),
5 on 3 (2 + 2 + 1), 11 training items on 2 ranks. Each rank records the indices it reads, so a duplicate
or a missing item is seen directly, not only through the totals.

The processes are joined by a gloo group with a short collective timeout (not ``spawn_cpu``'s default of
30 minutes), so ranks that fall out of step fail the test within a minute instead of hanging it; every
rank returns its own result.
"""
import datetime
import json
import os
import tempfile
import time
from collections import Counter

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import Dataset, TensorDataset

import vimtr
from vimtr.engine import train
from vimtr.engine.evaluate import evaluate

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

TINY = dict(depth=2, embed_dim=32, img_size=32, patch_size=8, num_classes=4)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return vimtr.create_model("vim_tiny", **TINY)


def tensors(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 4, (n,), generator=g)


class Recording(Dataset):
    """A dataset that appends every index it is asked for to ``<folder>/<pid>.txt``."""

    def __init__(self, dataset, folder):
        self.dataset, self.folder = dataset, folder

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        with open(os.path.join(self.folder, f"{os.getpid()}.txt"), "a") as f:
            f.write(f"{index}\n")
        return self.dataset[index]


def reads(folder) -> list[list[int]]:
    """The indices each process read, in order, one list per process that read any."""
    return [[int(line) for line in open(os.path.join(folder, name))]
            for name in sorted(os.listdir(folder)) if name.endswith(".txt")]


def spawn(fn, world, *args, timeout=180):
    """``fn(*args)`` in ``world`` one-thread processes joined by a gloo group; every rank's (JSON) value."""
    with tempfile.TemporaryDirectory(prefix="vimtr-shards-") as tmp:
        ctx = mp.start_processes(_entry, args=(world, tmp, fn, args), nprocs=world, join=False,
                                 start_method="fork")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise AssertionError(f"{fn.__name__} on {world} ranks did not finish in {timeout} s")
        return [json.loads(open(os.path.join(tmp, f"{rank}.json")).read()) for rank in range(world)]


def _entry(rank, world, tmp, fn, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, "store"), world), rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        value = fn(*args)
        with open(os.path.join(tmp, f"{rank}.json"), "w") as f:
            json.dump(value, f)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- evaluation
METRICS = ("images", "correct_top1", "correct_top5", "top1", "top5", "loss")


def _evaluate(n, folder):
    x, y = tensors(n, seed=n)
    res = evaluate(tiny_model().eval(), Recording(TensorDataset(x, y), folder), batch_size=2, progress=False)
    return {k: res[k] for k in (*METRICS, "world_size")}


@pytest.mark.parametrize("n,world", [(23, 2), (5, 3)])
def test_evaluation_on_uneven_shards_equals_one_process(n, world, tmp_path):
    one_dir, many_dir = tmp_path / "one", tmp_path / "many"
    one_dir.mkdir()
    many_dir.mkdir()
    one = _evaluate(n, str(one_dir))
    many = spawn(_evaluate, world, n, str(many_dir))
    assert one["images"] == n and 0 < one["correct_top1"] < n  # a result that other counts would change
    for rank, res in enumerate(many):
        assert res["world_size"] == world
        for key in METRICS[:-1]:
            assert res[key] == one[key], (rank, key, res[key], one[key])
        assert res["loss"] == pytest.approx(one["loss"], rel=1e-6)
    per_rank = reads(str(many_dir))
    assert len(per_rank) == world
    assert sorted(map(len, per_rank)) == sorted(len(range(r, n, world)) for r in range(world))
    total = Counter(i for r in per_rank for i in r)
    assert total == Counter(range(n)), f"read more than once: {[i for i, k in total.items() if k > 1]}"


# ---------------------------------------------------------------------------------------------- re-training
STEPS_KW = dict(epochs=2, lr=1e-3, weight_decay=0.05, drop_path=0.0, label_smoothing=0.1, distill_weight=0.5,
                progress=False, log=None)


def _retrain(n, batch_size, folder):
    x, y = tensors(n, seed=100 + n)
    vx, vy = tensors(5, seed=7)
    student = vimtr.reduce(tiny_model(seed=3), "rmeeto", r=4, interval=1)
    out = train.retrain(student, Recording(TensorDataset(x, y), folder), val_set=TensorDataset(vx, vy),
                        batch_size=batch_size, **STEPS_KW)
    weights = torch.cat([p.detach().flatten() for p in student.parameters()])
    return {"steps": out["steps"], "weights": weights.tolist(), "final": out["final"]["correct_top1"],
            "train_loss": [h.get("train_loss") for h in out["history"]]}


def test_retraining_on_uneven_shards_keeps_every_rank_in_step(tmp_path):
    """11 items on 2 ranks, 2 per batch: each rank takes 2 batches of its 6 or 5 items per epoch (whole
    optimizer steps, the same count on every rank, the 11th item left out as a single process with a batch
    of 4 leaves out its last 3). The ranks end with identical weights, read no item twice in an epoch, and
    follow the single process with the global batch (4) step for step."""
    n, world, batch = 11, 2, 2
    one_dir, many_dir = tmp_path / "one", tmp_path / "many"
    one_dir.mkdir()
    many_dir.mkdir()
    one = _retrain(n, world * batch, str(one_dir))
    many = spawn(_retrain, world, n, batch, str(many_dir))
    epochs = STEPS_KW["epochs"]
    steps = (n // world) // batch * epochs
    assert one["steps"] == steps and [r["steps"] for r in many] == [steps] * world
    for r in many[1:]:
        assert r["weights"] == many[0]["weights"], "the ranks' weights differ: they took different steps"
        assert r["final"] == many[0]["final"] and r["train_loss"] == many[0]["train_loss"]
    per_rank, (alone,) = reads(str(many_dir)), reads(str(one_dir))
    per_epoch = steps // epochs * batch  # items one rank reads in an epoch (the loader reads in order)
    assert len(per_rank) == world and all(len(r) == steps * batch for r in per_rank)
    for e in range(epochs):
        shards = [r[e * per_epoch:(e + 1) * per_epoch] for r in per_rank]
        together = [i for s in shards for i in s]
        assert len(set(together)) == len(together), f"epoch {e}: an item read twice across the ranks"
        assert set(together) == set(alone[e * world * per_epoch:(e + 1) * world * per_epoch])
    # The same samples per step as one process with the global batch: the same model up to rounding.
    got, want = torch.tensor(many[0]["weights"]), torch.tensor(one["weights"])
    moved = (want - torch.cat([p.detach().flatten() for p in vimtr.reduce(tiny_model(seed=3), "rmeeto", r=4,
                                                                         interval=1).parameters()])).abs()
    assert moved.max() > 1e-4  # training changed the weights, so the comparison below means something
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)  # measured: 1.3e-6
    for a, b in zip(many[0]["train_loss"], one["train_loss"]):
        assert (a is None and b is None) or a == pytest.approx(b, rel=1e-5)
