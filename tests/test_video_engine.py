"""``vimtr eval`` on real video files end to end: decode → sample → model → reduce → JSON, under torchrun
too; multi-view averaging; the JSON's clips / corrupt / skipped / protocol; bad input."""
import argparse
import json
import os
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vimtr
from vimtr.data import video
from vimtr.engine import evaluate as ev
from vimtr.errors import CorruptVideoWarning

from conftest import SMALL_VIDEO

pytest.importorskip("av", reason="video tests need PyAV: pip install 'vimtr[video]'")
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def cli(argv):
    parser = argparse.ArgumentParser(prog="vimtr")
    ev.add_cli(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["eval", *argv])


def run_eval(argv):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptVideoWarning)
        return ev.execute(cli([*argv, "--workers", "0", "--no-progress"]))


def manual_logits(model, dataset):
    """Each clip's (views, classes) logits, one view at a time, straight from the dataset's tensors."""
    out = []
    with torch.no_grad():
        for i in range(len(dataset)):
            x = dataset[i]
            if isinstance(x, video.Skipped):
                continue
            views = x[0] if x[0].dim() == 5 else x[0][None]
            out.append((torch.cat([model(v[None]) for v in views]), x[1]))
    return out


def test_eval_counts_clips_names_the_corrupt_file_and_records_the_protocol(video_set, video_ckpt, tmp_path):
    out = tmp_path / "out.json"
    res = run_eval(["--model", "videomamba_video_tiny", "--checkpoint", str(video_ckpt), "--data",
                    str(video_set["val_broken"]), "--num-frames", "8", "--json", str(out), "--batch-size", "4"])
    saved = json.loads(out.read_text())
    assert saved["clips"] == 6 and "images" not in saved  # every good clip of val_broken.csv
    assert saved["corrupt"] == 1 and saved["skipped"] == [str(video_set["videos"] / "1" / "broken.mp4")]
    assert saved["protocol"]["num_frames"] == 8 and saved["protocol"]["test_views"] == "1x1"
    assert saved["protocol"]["view_average"] == "softmax" and saved["clips_per_s"] > 0
    # The accuracy is the model's on the decoded clips.
    model = vimtr.load_model(video_ckpt)
    ds = video.load_video_dataset(video_set["val"], num_frames=8, size=32)
    pairs = manual_logits(model, ds)
    correct = sum(int(logits[0].argmax() == y) for logits, y in pairs)
    assert saved["correct_top1"] == correct and res["clips"] == len(pairs) == 6
    loss = sum(F.cross_entropy(logits, torch.tensor([y])).item() for logits, y in pairs) / 6
    assert saved["loss"] == pytest.approx(loss, rel=1e-5)


def test_eval_rmeeto_records_the_reduced_token_counts(video_set, video_ckpt, tmp_path):
    out = tmp_path / "r.json"
    run_eval(["--model", "videomamba_video_tiny", "--checkpoint", str(video_ckpt), "--data", str(video_set["val"]),
              "--num-frames", "8", "--method", "rmeeto", "--num-prune", "4", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert saved["tokens_per_block"] == [33, 33, 29, 29]  # r = 4 at block 2
    assert saved["config"]["reduction"]["method"] == "rmeeto" and saved["clips"] == 6
    assert saved["gflops"] < vimtr.flops(vimtr.load_model(video_ckpt)) / 1e9


@pytest.mark.parametrize("how", ["logits", "softmax"])
def test_multi_view_evaluation_is_the_mean_of_its_single_views(video_set, video_ckpt, how):
    """2 temporal clips x 3 crops: the evaluated scores are the views' mean logits (or mean softmax)."""
    model = vimtr.load_model(video_ckpt)
    ds = video.load_video_dataset(video_set["val"], num_frames=8, size=32, views="2x3")
    res = ev.evaluate(model, ds, batch_size=4, progress=False, view_average=how)
    pairs = manual_logits(model, ds)
    assert all(logits.shape == (6, 3) for logits, _ in pairs)
    if how == "logits":
        scores = torch.stack([logits.mean(0) for logits, _ in pairs])
    else:
        scores = torch.stack([logits.softmax(-1).mean(0).log() for logits, _ in pairs])
    y = torch.tensor([label for _, label in pairs])
    assert res["clips"] == 6 and res["protocol"]["test_views"] == "2x3"
    assert res["correct_top1"] == int((scores.argmax(-1) == y).sum())
    assert res["loss"] == pytest.approx(F.cross_entropy(scores, y).item(), rel=1e-5)
    # ... and not the first view alone.
    first = torch.stack([logits[0] for logits, _ in pairs])
    assert F.cross_entropy(first, y).item() != pytest.approx(res["loss"], rel=1e-5)


def test_forward_views_batches_all_views_at_once():
    torch.manual_seed(1)
    model = vimtr.create_model("videomamba_video_tiny", depth=2, img_size=32, num_frames=4, num_classes=5).eval()
    x = torch.randn(2, 3, *model.input_size)  # 2 clips x 3 views
    with torch.no_grad():
        got = ev.forward_views(model, x, "logits")
        want = torch.stack([torch.stack([model(x[b, v][None])[0] for v in range(3)]).mean(0) for b in range(2)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_on_corrupt_fail_stops_naming_the_video(video_set, video_ckpt):
    with pytest.raises(SystemExit, match=r"broken\.mp4.*cannot open the video"):
        run_eval(["--checkpoint", str(video_ckpt), "--data", str(video_set["val_broken"]), "--on-corrupt", "fail"])


def test_label_outside_the_head_is_a_clear_error(video_set, tmp_path):
    torch.manual_seed(0)
    two = vimtr.create_model("videomamba_video_tiny", **{**SMALL_VIDEO, "num_classes": 2})
    torch.save(two.state_dict(), tmp_path / "two.pth")
    with pytest.raises(SystemExit, match=r"outside the model's 2 classes \(0\.\.1\).*clip_\d\.mp4 has label 2"):
        run_eval(["--checkpoint", str(tmp_path / "two.pth"), "--data", str(video_set["val"])])


def test_frames_and_model_type_mismatches_are_clear_errors(video_set, video_ckpt, tmp_path):
    with pytest.raises(SystemExit, match="--num-frames 16: videomamba_video_tiny takes 8 frames"):
        run_eval(["--checkpoint", str(video_ckpt), "--data", str(video_set["val"]), "--num-frames", "16"])
    with pytest.raises(SystemExit, match="--test-views.*image model"):
        run_eval(["--model", "vim_digits", "--data", "digits", "--test-views", "4x3"])
    with pytest.raises(SystemExit, match="digits is an image set"):
        run_eval(["--checkpoint", str(video_ckpt), "--data", "digits"])
    with pytest.raises(SystemExit, match="CLIPSxCROPS"):
        run_eval(["--checkpoint", str(video_ckpt), "--data", str(video_set["val"]), "--test-views", "4by3"])


def test_image_results_name_unreadable_files_too(tmp_path):
    rng = np.random.default_rng(0)
    for c in range(2):
        (tmp_path / "val" / f"n{c}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "val" / f"n{c}" / f"{i}.png")
    (tmp_path / "val" / "n1" / "bad.png").write_bytes(b"not an image")
    torch.manual_seed(0)
    model = vimtr.create_model("vim_tiny", depth=2, embed_dim=32, img_size=32, patch_size=8, num_classes=2)
    torch.save({"model": model.state_dict()}, tmp_path / "vim.pth")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = ev.execute(cli(["--checkpoint", str(tmp_path / "vim.pth"), "--data", str(tmp_path / "val"),
                              "--workers", "0", "--no-progress"]))
    assert res["images"] == 4 and res["corrupt"] == 1 and "clips" not in res and "protocol" not in res
    assert res["skipped"] == [str(tmp_path / "val" / "n1" / "bad.png")]


def test_torchrun_two_processes_give_the_single_process_video_results(video_set, video_ckpt, tmp_path):
    from test_engine_eval import run_group

    common = ["--checkpoint", str(video_ckpt), "--data", str(video_set["val_broken"]), "--test-views", "2x1",
              "--method", "rmeeto", "--num-prune", "4", "--batch-size", "2"]
    run_eval([*common, "--json", str(tmp_path / "one.json")])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vimtr", "eval", *common, "--workers", "0", "--no-progress", "--json", str(tmp_path / "two.json")]
    rc, log = run_group(cmd, env, timeout=240)
    assert rc == 0, log[-3000:]
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert two["world_size"] == 2
    for key in ("clips", "correct_top1", "correct_top5", "corrupt", "skipped", "tokens_per_block", "protocol"):
        assert one[key] == two[key], key
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
