"""vimtr retrain: recovery after reduction, bit-exact resume after SIGKILL, checkpoints, DDP, bad input."""
import argparse
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.data import TensorDataset

import vimtr
from vimtr.data import folders as data
from vimtr.engine import distributed, recipe, train
from vimtr.errors import UsageError
from vimtr.engine.evaluate import evaluate

from conftest import run_group, save_ckpt, tiny_model, write_folder

pytestmark = pytest.mark.usefixtures("one_thread")


def cli(argv):
    parser = argparse.ArgumentParser(prog="vimtr")
    train.add_cli(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["retrain", *argv])


def quadrants(n, seed):
    """4 classes: which quadrant of a noisy 32×32 image is bright. A tiny Vim learns it in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(n, 3, 32, 32, generator=g) * 0.5
    for i, c in enumerate(y.tolist()):
        r, q = divmod(c, 2)
        x[i, :, r * 16:(r + 1) * 16, q * 16:(q + 1) * 16] += 1.0
    return TensorDataset(x, y)


def test_retrain_recovers_reduced_accuracy_and_checkpoint_reloads(tmp_path):
    train_set, val_set = quadrants(256, 0), quadrants(128, 1)
    model = tiny_model(depth=4, patch_size=4)
    train.retrain(model, train_set, epochs=3, batch_size=32, lr=3e-3, distill_weight=0, progress=False, log=None)
    vimtr.reduce(model, "rmeeto", r=16, interval=1)  # 65 → 49 → 33 → 17 tokens
    out = train.retrain(model, train_set, val_set=val_set, epochs=1, batch_size=32, lr=1e-3, progress=False,
                        log=None, out_dir=tmp_path / "run", recover_within=2.0)
    free, final = out["training_free_top1"], out["final"]["top1"]
    assert final >= free + 0.1, (free, final, out["reference_top1"])
    assert out["reference_top1"] is not None and out["history"][0]["epoch"] == 0

    loaded = vimtr.load_model(tmp_path / "run" / "last.pt")
    assert loaded.reduction == model.reduction
    x = val_set.tensors[0][:8]
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert loaded.reduction_trace["tokens"] == [65, 49, 33, 17]
    assert evaluate(loaded, val_set, progress=False)["top1"] == pytest.approx(final)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in log] == [0, 1] and {"train_loss", "lr", "top1", "images_per_s", "minutes"} <= set(log[1])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["final"]["top1"] == pytest.approx(final)


def _train_args(tmp_path, data_dir, ckpt, out, workers):
    return ["--checkpoint", str(ckpt), "--method", "rmeeto", "--num-prune", "6", "--param", "interval=1",
            "--data", str(data_dir), "--output", str(out), "--epochs", "2", "--batch-size", "4",
            "--save-every-steps", "1", "--model-ema", "--model-ema-decay", "0.9", "--lr", "1e-3",
            "--workers", str(workers), "--no-progress", "--amp", "none"]


def _mid_epoch(path):
    try:
        state = torch.load(path, weights_only=True)["train"]["state"]
    except Exception:  # not written yet (the rename is atomic: a file that exists is complete)
        return None
    return state if state["batch_in_epoch"] > 0 else None


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path):
    """DeiT augmentation, mixup/cutmix, repeated augmentation, EMA, distillation: the killed run (2 loader
    workers) resumed from its mid-epoch checkpoint ends with exactly the uninterrupted run's weights."""
    data_dir = tmp_path / "data"
    write_folder(data_dir / "train", per_class=12)
    write_folder(data_dir / "val", per_class=2, seed=1)
    ckpt = save_ckpt(tiny_model(patch_size=4), tmp_path / "tiny.pt")

    ref_args = cli(_train_args(tmp_path, data_dir, ckpt, tmp_path / "ref", workers=0))
    ref = train.execute(ref_args)
    assert ref["steps"] == 24

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "vimtr.engine.train", *_train_args(tmp_path, data_dir, ckpt, killed, workers=2)]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 120
    while _mid_epoch(killed / "last.pt") is None:
        assert proc.poll() is None, f"finished before a mid-epoch checkpoint was seen: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no mid-epoch checkpoint within 120 s"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    state = _mid_epoch(killed / "last.pt")
    assert state is not None and state["step"] < 24, "the kill should land mid-epoch, before the end"

    resume_args = cli([*_train_args(tmp_path, data_dir, ckpt, killed, workers=0), "--resume"])
    resumed = train.execute(resume_args)
    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (tmp_path / "ref", killed))
    for key in ("model", "model_ema"):
        assert a[key].keys() == b[key].keys()
        diff = [k for k in a[key] if not torch.equal(a[key][k], b[key][k])]
        assert not diff, f"{key}: {diff[:5]} differ after resuming from step {state['step']}"
    assert resumed["steps"] == ref["steps"] == b["train"]["state"]["step"]
    assert [h["top1"] for h in resumed["history"]] == [h["top1"] for h in ref["history"]]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    write_folder(root / "data" / "train", per_class=4)
    write_folder(root / "data" / "val", per_class=1, seed=1)
    torch.manual_seed(0)
    ckpt = save_ckpt(vimtr.create_model("vim_tiny", depth=2, embed_dim=32, img_size=32, patch_size=8,
                                        num_classes=4), root / "tiny.pt")
    argv = ["--checkpoint", str(ckpt), "--method", "rmeeto", "--num-prune", "3", "--param", "interval=1",
            "--data", str(root / "data"), "--output", str(root / "out"), "--epochs", "1", "--batch-size", "4",
            "--workers", "0", "--no-progress", "--model-ema", "--clip-grad", "1.0", "--warmup-steps", "1"]
    args = cli(argv)
    with torch.random.fork_rng():
        args.func(args)
    return root, argv


def test_checkpoint_is_weights_only_and_complete(finished_run):
    root, _ = finished_run
    ck = torch.load(root / "out" / "last.pt", weights_only=True)
    assert {"vimtr", "model", "model_ema", "optimizer", "scheduler", "rng", "train"} <= set(ck)
    assert ck["vimtr"]["reduction"]["method"] == "rmeeto" and ck["vimtr"]["model_name"] == "vim_tiny"
    assert len(ck["rng"]) == 1 and {"python", "numpy", "torch"} <= set(ck["rng"][0])
    assert ck["train"]["state"]["epoch"] == 1 and ck["train"]["config"]["epochs"] == 1
    assert (root / "out" / "best.pt").exists()
    assert not [p for p in (root / "out").iterdir() if p.name.endswith(".tmp")]
    # vimtr eval rebuilds the reduced model from the checkpoint alone
    ema = vimtr.load_model(root / "out" / "last.pt", use_ema=True)
    assert ema.reduction["method"] == "rmeeto"


@pytest.mark.parametrize("change, expect", [
    (["--num-prune", "2"], "token reduction"),
    (["--batch-size", "2"], "batch_size"),
    (["--seed", "1"], "seed"),
    (["--drop-path", "0.05"], "drop_path"),
])
def test_resume_with_different_settings_is_refused(finished_run, change, expect):
    root, argv = finished_run
    argv = list(argv)
    if change[0] in argv:
        argv[argv.index(change[0]) + 1] = change[1]
    else:
        argv += change
    args = cli([*argv, "--resume"])
    log = (root / "out" / "log.jsonl").read_text()
    with pytest.raises(SystemExit, match=expect):
        args.func(args)
    assert (root / "out" / "log.jsonl").read_text() == log  # a refused resume leaves the run untouched


def test_existing_output_needs_resume(finished_run):
    root, argv = finished_run
    args = cli(argv)
    with pytest.raises(SystemExit, match="--resume"):
        args.func(args)


@pytest.mark.parametrize("kwargs, expect", [
    (dict(batch_size=64), "lower the batch size"),
    (dict(batch_size=3, mixup=0.8), "even batch size"),
    (dict(batch_size=0), "positive integer"),
    (dict(train_fraction=0.0), "train fraction"),
    (dict(drop_path=1.5), "drop_path"),
])
def test_impossible_settings(kwargs, expect):
    with pytest.raises(UsageError, match=expect):
        train.retrain(tiny_model(), quadrants(16, 0), **{"progress": False, "log": None, **kwargs})


def test_drop_path_setting_reaches_the_student():
    student = vimtr.reduce(tiny_model(drop_path_rate=0.1), "rmeeto", r=2)
    summary = train.retrain(student, quadrants(16, 0), epochs=1, batch_size=8, drop_path=0.0, progress=False,
                            log=None)
    assert summary["config"]["drop_path"] == 0.0
    assert all(isinstance(b.drop_path, torch.nn.Identity) for b in student.layers)


def test_param_groups_skip_norms_biases_and_embeddings():
    model = tiny_model()
    decay, no_decay = recipe.param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    plain = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_embed", "cls_token", "head.bias", "norm_f.weight", "layers.0.mixer.A_log"} <= plain
    assert all(model.get_parameter(names[id(p)]).ndim > 1 for p in decay["params"])
    assert "head.weight" in {names[id(p)] for p in decay["params"]} and no_decay["weight_decay"] == 0


def test_param_groups_of_a_deep_copy_are_the_originals():
    """copy.deepcopy drops the _no_weight_decay mark on A_log; a deep-copied student (the demo's, the
    teacher's) must still keep A_log out of weight decay."""
    import copy
    model = tiny_model()
    twin = copy.deepcopy(model)
    assert not hasattr(twin.layers[0].mixer.A_log, "_no_weight_decay")  # why the class lists the names
    groups = [[n for n, p in m.named_parameters() if any(p is q for q in g["params"])]
              for m in (model, twin) for g in recipe.param_groups(m, 0.05)]
    assert groups[:2] == groups[2:] and "layers.0.mixer.A_b_log" in groups[1]


def test_epoch_sampler_shards_repeats_and_skips():
    full = data.EpochSampler(10, 2, seed=3, repeats=3)
    full.set_epoch(1)
    keys = list(full)
    assert len(keys) == 10 and len({k[1] for k in keys}) == 10  # one augmentation seed per position
    assert [k[0] for k in keys][:3] == [keys[0][0]] * 3  # DeiT repeated augmentation: copies in a row
    full.set_epoch(1, skip=4)
    assert list(full) == keys[4:]
    ranks = [data.EpochSampler(11, 2, rank=r, world=2, seed=3) for r in (0, 1)]
    for s in ranks:
        s.set_epoch(0)
    a, b = (list(s) for s in ranks)
    assert len(a) == len(b) == 4 and not {k[0] for k in a} & {k[0] for k in b}


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path):
    """Under torchrun, with uneven shards: 17 training images (8 per rank, in whole steps) and 5 to evaluate
    (3 + 2, every one counted once)."""
    data_dir = tmp_path / "data"
    write_folder(data_dir / "train", per_class=4)
    write_folder(data_dir / "val", per_class=1, seed=1)
    for split in ("train", "val"):  # one more image each: shards of unequal size
        image = (data_dir / split / "n00000001" / "0.png").read_bytes()
        (data_dir / split / "n00000002" / "extra.png").write_bytes(image)
    ckpt = save_ckpt(tiny_model(), tmp_path / "tiny.pt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vimtr.engine.train", "--checkpoint", str(ckpt), "--method", "rmeeto", "--num-prune", "3",
           "--param", "interval=1", "--data", str(data_dir), "--output", str(tmp_path / "out"), "--epochs", "1",
           "--batch-size", "2", "--accum-steps", "2", "--workers", "0", "--no-progress", "--model-ema"]
    rc, log = run_group(cmd, {**os.environ, "OMP_NUM_THREADS": "1"}, timeout=180)
    assert rc == 0, log[-3000:]
    ck = torch.load(tmp_path / "out" / "last.pt", weights_only=True)
    assert len(ck["rng"]) == 2 and ck["train"]["config"]["world_size"] == 2
    assert ck["train"]["config"]["global_batch"] == 8 and ck["train"]["state"]["step"] == 2
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["final"]["images"] == 5 and results["final"]["world_size"] == 2
    assert ck["train"]["config"]["train_size"] == 17


def test_retrain_cli_on_digits(tmp_path):
    """The built-in tensors (1 channel): no PIL augmentation; mixup and distillation still apply."""
    torch.manual_seed(0)
    ckpt = save_ckpt(vimtr.create_model("vim_digits", depth=2), tmp_path / "digits.pt")
    args = cli(["--checkpoint", str(ckpt), "--method", "rmeeto", "--r", "16", "--param", "interval=1",
                "--data", "digits", "--train-fraction", "0.03", "--epochs", "1", "--batch-size", "8",
                "--output", str(tmp_path / "out"), "--workers", "0", "--no-progress", "--lr", "1e-3"])
    out = train.execute(args)
    assert out["config"]["train_size"] == 43 and out["steps"] == 5 and out["final"]["images"] == 360
    assert out["config"]["augment"] is False and out["config"]["mixup"] == 0.8
    assert vimtr.load_model(tmp_path / "out" / "best.pt").reduction["method"] == "rmeeto"


def test_ema_starts_from_given_weights(tmp_path):
    student, other = tiny_model(seed=0), tiny_model(seed=1)
    out = train.retrain(student, quadrants(8, 0), epochs=1, batch_size=8, ema_decay=1.0,
                        ema_init=other.state_dict(), out_dir=tmp_path, progress=False, log=None)
    ck = torch.load(tmp_path / "last.pt", weights_only=True)
    assert out["steps"] == 1
    assert all(torch.equal(ck["model_ema"][k], v) for k, v in other.state_dict().items())
    assert not torch.equal(ck["model"]["head.weight"], other.state_dict()["head.weight"])


def _rank_sum(scale):
    """Runs in each spawned process: the group is joined, one thread each, ranks see each other."""
    import torch.distributed as dist
    ctx = distributed.context()
    t = torch.tensor([float(ctx.rank + 1)])
    if ctx.distributed:
        dist.all_reduce(t)
    return {"sum": scale * t.item(), "world": ctx.world, "threads": torch.get_num_threads()}


def _fails_on_rank_1():
    if distributed.context().rank == 1:
        raise ValueError("rank 1 failed on purpose")
    return {}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_spawn_cpu_joins_a_gloo_group_and_returns_rank_0s_value(method):
    if method == "fork":  # the default on Linux; after this process has run kernels on two threads
        assert distributed.default_start_method() == ("fork" if sys.platform.startswith("linux") else "spawn")
        threads = torch.get_num_threads()
        torch.set_num_threads(2)
        torch.randn(256, 256) @ torch.randn(256, 256)
        torch.set_num_threads(threads)
    run = lambda *a: distributed.spawn_cpu(*a, start_method=method)
    assert run(_rank_sum, 2, 10.0) == {"sum": 30.0, "world": 2, "threads": 1}
    assert run(_rank_sum, 1, 10.0)["sum"] == 10.0  # in this process, no group
    with pytest.raises(Exception, match="rank 1 failed on purpose"):
        run(_fails_on_rank_1, 2)
    assert 1 <= distributed.cpu_workers(2) <= 2


def _share_report(share):
    """Runs in each mapped process: no group, one thread, its own share."""
    if share == "fail":
        raise ValueError("this share failed on purpose")
    return {"share": share, "grouped": distributed.context().distributed, "threads": torch.get_num_threads()}


def test_map_cpu_runs_each_share_in_its_own_process_and_keeps_the_order():
    shares = [[1, 2], [3], [4, 5, 6]]
    assert distributed.map_cpu(_share_report, shares) == [
        {"share": s, "grouped": False, "threads": 1} for s in shares]
    here = distributed.map_cpu(_share_report, [[7]])  # one share: in this process, at its thread count
    assert here == [{"share": [7], "grouped": False, "threads": torch.get_num_threads()}]
    with pytest.raises(Exception, match="this share failed on purpose"):
        distributed.map_cpu(_share_report, [[1], "fail"])


def test_adamw_is_fused_on_cpu_and_matches_the_per_parameter_loop():
    """recipe.adamw takes torch's fused kernel (one call for all tensors): same groups, same update as the
    default loop up to rounding."""
    import copy

    import vimtr
    from vimtr.engine import recipe

    model = vimtr.create_model("vim_digits").eval()  # eval: no drop-path draws, the two runs see the same
    twin = copy.deepcopy(model)
    fused = recipe.adamw(model, 1e-3, 0.05)
    loop = torch.optim.AdamW(recipe.param_groups(twin, 0.05), lr=1e-3)
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    assert [g["weight_decay"] for g in fused.param_groups] == [0.05, 0.0]
    x = torch.randn(4, 1, 32, 32)
    for _ in range(3):  # the same gradients into both (tiny gradients' rounding would flip Adam's steps)
        model(x).square().mean().backward()
        for a, b in zip(model.parameters(), twin.parameters()):
            b.grad = a.grad.clone()
        fused.step()
        loop.step()
        fused.zero_grad()
        loop.zero_grad()
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)
