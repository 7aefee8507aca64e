"""vimtr eval: metrics, JSON, exact torchrun sharding, bad input. Tiny models, tiny PNG folders."""
import argparse
import json
import os
import sys

import pytest
import torch
from torch.utils.data import TensorDataset

import vimtr
from vimtr.engine import evaluate as ev
from vimtr.engine.common import parse_param, parse_value
from vimtr.errors import UsageError

from conftest import run_group, save_ckpt, tiny_model, write_folder

# One thread: the machine is shared, and oversubscribed threads make tiny models slow.
pytestmark = pytest.mark.usefixtures("one_thread")


def cli(argv):
    parser = argparse.ArgumentParser(prog="vimtr")
    ev.add_cli(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["eval", *argv])


def test_parse_values():
    assert [parse_value(v) for v in ("3", "0.5", "true", "False", "none", "x", "1,2")] == \
        [3, 0.5, True, False, None, "x", [1, 2]]
    assert parse_param("metric=x") == ("metric", "x")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_param("novalue")


def test_evaluate_api_matches_manual_computation():
    model = tiny_model().eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(23, 3, 32, 32, generator=g), torch.randint(0, 4, (23,), generator=g)
    res = ev.evaluate(model, TensorDataset(x, y), batch_size=5, progress=False)
    with torch.no_grad():
        logits = model(x)
    assert res["images"] == 23
    assert res["correct_top1"] == int((logits.argmax(-1) == y).sum())
    assert res["top1"] == pytest.approx(res["correct_top1"] / 23)
    assert res["top5"] == 1.0 and res["top5_k"] == 4  # 4 classes: top-5 is top-4
    assert res["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    assert res["gflops"] > res["gflops_rmeeto"] > 0
    assert res["tokens_per_block"] == [17, 17]
    assert set(ev.RESULT_KEYS) <= set(res)


def test_eval_cli_reduced_checkpoint_json(tmp_path, capsys):
    write_folder(tmp_path / "data" / "val", per_class=2)
    ckpt = save_ckpt(tiny_model(patch_size=4), tmp_path / "tiny.pt")
    out = tmp_path / "res" / "eval.json"
    args = cli(["--checkpoint", str(ckpt), "--method", "rmeeto", "--r", "8", "--param", "interval=1",
                "--data", str(tmp_path / "data"), "--batch-size", "3", "--workers", "0", "--json", str(out),
                "--no-progress"])
    res = ev.execute(args)
    saved = json.loads(out.read_text())
    for key in ("images", "top1", "top5", "loss", "gflops", "images_per_s", "config"):
        assert key in saved
    # The metrics as computed here, from the same images through the same model and reduction.
    model = vimtr.reduce(vimtr.load_model(ckpt), "rmeeto", r=8, interval=1).eval()
    from vimtr.data import eval_transform, load_dataset
    folder = load_dataset(str(tmp_path / "data" / "val"), "val", transform=eval_transform(model))
    x = torch.stack([folder[i][0] for i in range(len(folder))])
    y = torch.tensor([folder[i][1] for i in range(len(folder))])
    with torch.no_grad():
        logits = model(x)
    assert saved["images"] == 8
    assert saved["correct_top1"] == int((logits.argmax(-1) == y).sum())
    assert saved["top1"] == pytest.approx(saved["correct_top1"] / 8)
    assert saved["correct_top5"] == int((logits.topk(4, dim=-1).indices == y[:, None]).any(-1).sum())
    assert saved["loss"] == pytest.approx(torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    assert saved["config"]["reduction"]["method"] == "rmeeto"
    assert saved["tokens_per_block"] == [65, 57] and res["tokens_per_block"] == [65, 57]
    assert saved["gflops"] < vimtr.flops(tiny_model(patch_size=4)) / 1e9
    assert "top-1" in capsys.readouterr().out
    assert not [p for p in out.parent.iterdir() if p.name != "eval.json"]  # no temp files left


@pytest.mark.slow
def test_torchrun_two_processes_match_one_exactly(tmp_path):
    """22 images + one corrupt file, 23 items: uneven shards (12 and 11 items), and 2 gloo processes under
    torchrun give the single-process totals."""
    root = write_folder(tmp_path / "val", per_class=6)
    os.remove(root / "n00000003" / "5.png")
    os.remove(root / "n00000002" / "5.png")  # 22 readable images
    (root / "n00000001" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    ckpt = save_ckpt(tiny_model(), tmp_path / "tiny.pt")
    common = ["--checkpoint", str(ckpt), "--method", "mtr", "--num-prune", "3", "--param", "interval=1", "--data", str(root),
              "--batch-size", "4", "--workers", "0", "--no-progress"]
    single = cli([*common, "--json", str(tmp_path / "one.json")])
    with pytest.warns(UserWarning, match="broken.png"):
        ev.execute(single)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vimtr", "eval", *common, "--json", str(tmp_path / "two.json")]
    rc, log = run_group(cmd, env, timeout=180)
    assert rc == 0, log[-3000:]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert two["world_size"] == 2 and one["world_size"] == 1
    for key in ("images", "correct_top1", "correct_top5", "corrupt", "tokens_per_block", "gflops"):
        assert one[key] == two[key], key
    assert one["images"] == 22 and one["corrupt"] == 1
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)


@pytest.mark.parametrize("case", ["missing", "empty", "classes", "corrupt", "batch", "r_without_method",
                                  "no_model", "bad_method"])
def test_bad_input_clear_messages(tmp_path, case):
    data = write_folder(tmp_path / "val", per_class=1)
    ckpt = save_ckpt(tiny_model(), tmp_path / "tiny.pt")
    out = tmp_path / "out.json"
    argv = ["--checkpoint", str(ckpt), "--data", str(data), "--workers", "0", "--no-progress", "--json", str(out)]
    expect = {"missing": "does not exist", "empty": "no usable images", "classes": "has 5 classes",
              "corrupt": "bad.png", "batch": "positive integer", "r_without_method": "--method",
              "no_model": "--checkpoint", "bad_method": "unknown reduction method"}[case]
    if case == "missing":
        argv[3] = str(tmp_path / "nowhere")
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        argv[3] = str(tmp_path / "empty")
    elif case == "classes":
        write_folder(data, per_class=1, classes=5)
    elif case == "corrupt":
        (data / "n00000000" / "bad.png").write_bytes(b"garbage")
        argv += ["--on-corrupt", "fail"]
    elif case == "batch":
        argv += ["--batch-size", "0"]
    elif case == "r_without_method":
        argv += ["--r", "3"]
    elif case == "no_model":
        argv = argv[2:]
    elif case == "bad_method":
        argv += ["--method", "nope"]
    args = cli(argv)
    with pytest.raises(SystemExit) as err:
        args.func(args)
    assert expect in str(err.value) and str(err.value).startswith("vimtr eval: error:")
    assert not out.exists()  # nothing half written


def test_evaluate_rejects_empty_dataset():
    with pytest.raises(UsageError, match="empty"):
        ev.evaluate(tiny_model(), TensorDataset(torch.zeros(0, 3, 32, 32), torch.zeros(0, dtype=torch.long)))


def test_eval_digits_builtin(tmp_path):
    torch.manual_seed(0)
    ckpt = save_ckpt(vimtr.create_model("vim_digits", depth=2), tmp_path / "digits.pt")
    args = cli(["--checkpoint", str(ckpt), "--data", "digits", "--batch-size", "180", "--workers", "0",
                "--method", "rmeeto", "--r", "16", "--param", "interval=1", "--no-progress"])
    res = ev.execute(args)
    assert res["images"] == 360 and res["tokens_per_block"] == [65, 49] and res["config"]["data"] == "digits"


def test_registered_with_the_vimtr_cli(tmp_path, capsys):
    """`vimtr eval` through vimtr.cli: the command returns exit status 0, results go to --json."""
    from vimtr import cli as vimtr_cli
    ckpt = save_ckpt(tiny_model(), tmp_path / "tiny.pt")
    data = write_folder(tmp_path / "val", per_class=1)
    rc = vimtr_cli.main(["eval", "--checkpoint", str(ckpt), "--data", str(data), "--workers", "0",
                         "--no-progress", "--json", str(tmp_path / "r.json")])
    assert rc == 0 and json.loads((tmp_path / "r.json").read_text())["images"] == 4
    assert "retrain" in vimtr_cli.build_parser().format_help()
