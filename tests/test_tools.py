"""End-to-end runs of the user-facing commands on the bundled model (CLI in-process)."""
import json

import pytest
import torch

import vimtr
from vimtr.cli import main
from vimtr.data.clutter import clutter_tensors
from vimtr.data.digits import digits_tensors


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_bundled_model_accuracy_on_the_test_split():
    model = vimtr.load_model("vim_digits")
    card = json.loads((vimtr.models.checkpoint.assets_dir() / "vim_digits.json").read_text())
    x, y = digits_tensors("test")
    with torch.no_grad():
        acc = (model(x).argmax(-1) == y).float().mean().item()
    assert acc >= 0.97
    assert abs(acc - card["test_top1"]) <= 2 / len(y)  # the card's number, up to kernel rounding
    assert (vimtr.models.checkpoint.assets_dir() / "vim_digits.safetensors").stat().st_size <= 5 * 2 ** 20


@pytest.mark.slow
def test_demo_quick_writes_well_formed_results(tmp_path):
    main(["demo", "--quick", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "results.json").read_text())
    rows = {r["method"]: r for r in res["rows"]}
    assert set(rows) == {"baseline", "mtr", "rmeeto", "rmeeto_retrained", "tome", "evit", "utr", "random",
                         "positional"}
    # The default model: the cluttered digits, 100+ patch tokens (the model the demo names, loaded again).
    assert res["model"] == "vim_digits_clutter" and res["dataset"] == "digits-clutter/test"
    assert vimtr.load_model(res["model"]).num_patches == res["patch_tokens"] >= 100
    for r in rows.values():
        assert r["images_per_s"] > 0
        assert {"method", "top1", "gflops", "flops_saved", "images_per_s"} <= set(r)
    # The baseline row against the bundled model measured here; the others' savings against that row.
    model = vimtr.load_model("vim_digits_clutter")
    x, y = clutter_tensors("test")
    with torch.no_grad():
        acc = (model(x).argmax(-1) == y).float().mean().item()
    assert rows["baseline"]["top1"] == pytest.approx(acc, abs=1 / len(y))  # up to kernel rounding (batching)
    assert rows["baseline"]["top1"] >= 0.97
    assert rows["baseline"]["gflops"] == pytest.approx(vimtr.flops(model) / 1e9, rel=1e-9)
    assert rows["baseline"]["flops_saved"] == 0.0
    for m in ("mtr", "rmeeto", "tome", "evit", "utr", "random", "positional", "rmeeto_retrained"):
        assert rows[m]["flops_saved"] == pytest.approx(1 - rows[m]["gflops"] / rows["baseline"]["gflops"]), m
        assert abs(rows[m]["flops_saved"] - 0.3) <= 0.01, m
    assert rows["positional"]["gflops"] == rows["random"]["gflops"]  # the same schedule, the same FLOPs
    # The quick re-training (a quarter epoch) starts from rmeeto at 97% and must not wreck it: a recipe that
    # does (the former lr 4e-3 took it to 85%) fails here. Whether it recovers the last point is the full
    # demo's measurement (docs/demo.md), not a test's.
    assert rows["rmeeto_retrained"]["top1"] >= rows["rmeeto"]["top1"] - 0.03
    assert rows["rmeeto_retrained"]["retrain_epochs"] == 1
    assert rows["rmeeto_retrained"]["retrain_augment"] is True and rows["rmeeto_retrained"]["retrain_drop_path"] == 0.0
    for png in ("acc_vs_flops.png", "acc_vs_throughput.png", "token_maps.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    phases = res["phase_seconds"]
    assert list(phases) == ["sweep", "retrain", "timing", "figures"] and min(phases.values()) > 0
    assert sum(phases.values()) <= res["seconds"]


def test_bench_json(tmp_path):
    out = tmp_path / "bench.json"
    main(["bench", "--model", "vim_digits", "--method", "mtr", "rmeeto:r=4", "--batch-size", "2",
          "--runs", "2", "--warmup", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["config"] for r in rows] == ["baseline", "mtr", "rmeeto:r=4"]
    model = vimtr.load_model("vim_digits")
    full = vimtr.flops(model) / 1e9
    reduced = vimtr.flops(vimtr.reduce(model, "rmeeto", r=4)) / 1e9
    assert rows[0]["gflops"] == pytest.approx(full) and rows[2]["gflops"] == pytest.approx(reduced)
    for r in rows:  # speed-up and FLOPs ratio: against the unreduced row of the same run
        assert r["median_s"] > 0 and r["images_per_s"] == pytest.approx(2 / r["median_s"])
        assert r["speedup"] == pytest.approx(rows[0]["median_s"] / r["median_s"])
        assert r["flops_ratio"] == pytest.approx(full / r["gflops"])
    assert rows[2]["flops_ratio"] > 1.0


@pytest.mark.slow
def test_sweep_outputs(tmp_path):
    main(["sweep", "--model", "vim_digits", "--data", "digits", "--method", "mtr", "random",
          "--levels", "0.2", "0.4", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "sweep.json").read_text())["rows"]
    assert [(r["method"], r["level"]) for r in rows] == [("baseline", 0.0), ("mtr", 0.2), ("mtr", 0.4),
                                                         ("random", 0.2), ("random", 0.4)]
    for r in rows:  # random: the mean over seeds 0-4, with its spread; the others: one deterministic run
        if r["method"] == "random":
            assert r["seeds"] == [0, 1, 2, 3, 4]
        else:
            assert "seeds" not in r
    assert (tmp_path / "sweep.csv").read_text().splitlines()[0].startswith("method,level,top1")
    for png in ("acc_vs_flops.png", "acc_vs_throughput.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_random_row_is_the_mean_over_seeds_with_their_spread():
    """random at 0.4, seed by seed, measured here: the sweep row's mean, spread and extremes are those of the
    accuracies of seeds 0-4."""
    from torch.utils.data import Subset

    from vimtr.data.digits import digits_dataset
    from vimtr.tools.sweep import measure

    model = vimtr.load_model("vim_digits")
    test = Subset(digits_dataset("test"), range(64))
    row = measure(model, test, "random", {"flops_reduction": 0.4}, batch_size=64)
    x, y = digits_tensors("test")
    x, y = x[:64], y[:64]
    accs = []
    for seed in range(5):
        vimtr.reduce(model, "random", flops_reduction=0.4, seed=seed)
        with torch.no_grad():
            accs.append((model(x).argmax(-1) == y).double().mean().item())
    assert row["seeds"] == [0, 1, 2, 3, 4]
    assert row["top1"] == pytest.approx(sum(accs) / 5, abs=1e-12)
    assert (row["top1_min"], row["top1_max"]) == (min(accs), max(accs))
    assert row["top1_std"] == pytest.approx(torch.tensor(accs, dtype=torch.float64).std().item())
    assert max(accs) > min(accs)  # the seeds differ: the spread is not trivially zero


@pytest.mark.slow
def test_sweep_in_two_processes_measures_what_one_process_does():
    """The points shared out among one-thread processes: the same rows, in order, with the same accuracies
    and FLOPs as one thread computes them alone (only the im/s are each process's own)."""
    from torch.utils.data import Subset

    from vimtr.data.digits import digits_dataset
    from vimtr.tools.sweep import _shares, sweep

    model = vimtr.load_model("vim_digits")
    test = Subset(digits_dataset("test"), range(96))
    kw = dict(methods=("mtr", "random", "tome"), levels=(0.2, 0.4), params={"interval": 2}, random_seeds=3,
              progress=False, batch_size=32)
    one, two = sweep(model, test, processes=1, **kw), sweep(model, test, processes=2, **kw)
    keys = ("method", "level", "top1", "top5", "loss", "gflops", "flops_saved", "final_tokens", "seeds")
    assert [[r.get(k) for k in keys] for r in two] == [[r.get(k) for k in keys] for r in one]
    assert all(r["images_per_s"] > 0 for r in two)
    for r in two:  # each point's speed-up is against the unreduced point of the same sweep
        assert r["speedup"] == pytest.approx(r["images_per_s"] / two[0]["images_per_s"])
    assert not model.reducer  # the parent's model is left unreduced
    # Balanced by evaluations: each random point is 3 of the 1 + 4 + 2 * 3 = 11.
    jobs = [(None, None)] + [(m, {"flops_reduction": lv}) for m in kw["methods"] for lv in kw["levels"]]
    shares = _shares(jobs, 2, 3)
    assert sorted(i for s in shares for i in s) == list(range(len(jobs)))
    assert sorted(sum(3 if jobs[i][0] == "random" else 1 for i in s) for s in shares) == [5, 6]
    with pytest.raises(ValueError, match="--processes 1"):
        sweep(model, test, processes=2, device="meta", **kw)


def test_visualize_and_info(tmp_path, capsys):
    out = tmp_path / "map.png"
    main(["visualize", "digits:3", "--method", "mtr", "rmeeto", "tome", "--out", str(out)])
    assert out.read_bytes()[:4] == b"\x89PNG"
    main(["info", "--model", "vim_digits", "--method", "rmeeto", "--param", "r=4"])
    text = capsys.readouterr().out
    assert "parameters" in text and "tokens per block" in text


@pytest.mark.slow
def test_warmup_reaches_the_inference_and_training_kernels():
    """`vimtr warmup` (make install runs it) must call every kernel the demo uses, the backward ones too:
    a fresh process, so that nothing earlier in this test session has called them already."""
    import subprocess
    import sys

    code = ("import json; from vimtr.cli import main; main(['warmup']); "
            "from vimtr.ops.cpu import conv, norm, scan_backward, scan_forward; "
            "ks = dict(scan=scan_forward.forward_kernel(16), scan_backward=scan_backward.backward_kernel(16), "
            "conv=conv._conv_bidir, conv_backward=conv._conv_bidir_backward, merge_norm=norm._mapped_add_rmsnorm); "
            "print(json.dumps({k: len(v.signatures) for k, v in ks.items()}))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "CPU kernels ready" in done.stdout
    called = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(called.values()), called


def test_bad_input_is_one_clear_line(capsys):
    with pytest.raises(SystemExit) as e:
        main(["visualize", "no_such_image.png", "--model", "vim_digits"])
    assert e.value.code == 2
    assert "no_such_image.png" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--model", "vim_digits", "--method", "nosuch"])
    assert "valid methods" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["sweep", "--model", "vim_digits", "--processes", "0"])
    assert "--processes must be >= 1" in capsys.readouterr().err


def test_demo_times_each_table_row_with_its_own_reduction(monkeypatch):
    """The table's speed-ups come from one alternating timing of every row's model; each must be timed
    reduced as its row says (the re-trained student included, which measure() leaves unreduced)."""
    import copy

    from vimtr.tools import benchmark, demo

    seen = {}

    def fake(models, batch_size, rounds):
        seen.update(models)
        return {k: 1.0 + i for i, k in enumerate(models)}

    monkeypatch.setattr(benchmark, "time_alternating", fake)
    model = vimtr.load_model("vim_digits")
    student = vimtr.restore(copy.deepcopy(model))
    rows = [{"method": m} for m in ("baseline", *demo.METHODS, "rmeeto_retrained")]
    demo.time_table_rows(rows, model, student, 0.3)
    assert set(seen) == {r["method"] for r in rows}
    assert seen["baseline"].reducer is None
    full = vimtr.flops(seen["baseline"])
    for method, m in seen.items():
        if method != "baseline":
            assert m.reducer is not None and abs(1 - vimtr.flops(m) / full - 0.3) <= 0.01, method
    assert model.reducer is None and student.reducer is None  # the caller's models are not changed
    times = fake(seen, 0, 0)
    for r in rows:
        assert r["speedup"] == times["baseline"] / times[r["method"]]
        assert r["images_per_s"] == 128 / times[r["method"]]


@pytest.mark.parametrize("dt_range", [None, (0.01, 0.5)])
def test_train_digits_delta_init_range(dt_range):
    import torch.nn.functional as F

    from vimtr.data.digits import augment
    from vimtr.tools.train_digits import init_backward_dt
    torch.manual_seed(0)
    model = vimtr.create_model("vim_digits")
    init_backward_dt(model, dt_range)
    lo, hi = dt_range or (0.001, 0.1)
    for layer in model.layers:
        for proj in (layer.mixer.dt_proj, layer.mixer.dt_proj_b):
            dt = F.softplus(proj.bias.detach())
            assert dt.min() >= lo * (1 - 1e-4) and dt.max() <= hi * (1 + 1e-4)
    x, _ = digits_tensors("test")
    for strength in ("default", "strong"):
        assert augment(x[:3], strength).shape == x[:3].shape
