"""``vimtr retrain`` on video clips (R-MeeTo's K400 recipe, tiny): training reads, samples and augments real
video files, several clips per video, mixes clips frame-consistently, validates, and writes a checkpoint
that ``vimtr eval`` reloads reduced."""
import argparse
import json
import warnings

import pytest
import torch
from timm.data import Mixup

import vimtr
from vimtr.data import video
from vimtr.engine import evaluate as ev, recipe, train
from vimtr.errors import CorruptVideoWarning

pytest.importorskip("av", reason="video tests need PyAV: pip install 'vimtr[video]'")
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def cli(command, module, argv):
    parser = argparse.ArgumentParser(prog="vimtr")
    module.add_cli(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args([command, *argv])


def test_retrain_cli_on_video_clips_then_eval_the_checkpoint(video_set, video_ckpt, tmp_path):
    out = tmp_path / "run"
    argv = ["--checkpoint", str(video_ckpt), "--method", "rmeeto", "--num-prune", "4", "--data", str(video_set["train"]),
            "--val-data", str(video_set["val_broken"]), "--num-frames", "8", "--epochs", "1", "--batch-size", "2",
            "--num-sample", "2", "--repeated-aug", "1", "--lr", "1e-4", "--warmup-epochs", "1",
            "--aa", "rand-m5-n2-mstd0.25-inc1", "--output", str(out), "--workers", "0", "--no-progress"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptVideoWarning)
        summary = train.execute(cli("retrain", train, argv))
    saved = json.loads((out / "results.json").read_text())
    assert saved["steps"] == 3 == summary["steps"]  # 6 training videos, 2 per step
    cfg = saved["config"]
    assert cfg["num_sample"] == 2 and cfg["warmup_total_steps"] == 3 and cfg["train_size"] == 6
    assert cfg["val_protocol"]["num_frames"] == 8 and cfg["val_protocol"]["test_views"] == "1x1"
    final = saved["final"]
    assert final["clips"] == 6 and final["skipped"] == [str(video_set["videos"] / "1" / "broken.mp4")]
    assert final["tokens_per_block"] == [33, 33, 29, 29]
    assert saved["training_free_top1"] is not None and saved["reference_top1"] is not None
    # The checkpoint comes back reduced and evaluates on video.
    model = vimtr.load_model(out / "last.pt")
    assert model.reduction["method"] == "rmeeto" and model.num_frames == 8
    res = ev.execute(cli("eval", ev, ["--checkpoint", str(out / "last.pt"), "--data", str(video_set["val"]),
                                      "--test-views", "2x3", "--workers", "0", "--no-progress"]))
    assert res["clips"] == 6 and res["tokens_per_block"] == [33, 33, 29, 29]


@pytest.mark.parametrize("num_sample", [1, 2])
def test_num_sample_trains_on_every_clip_of_every_video(video_set, video_ckpt, num_sample):
    model = vimtr.reduce(vimtr.load_model(video_ckpt), "rmeeto", r=4)
    train_set = video.load_video_dataset(video_set["train"], num_frames=8, size=32)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    train.retrain(model, train_set, epochs=1, batch_size=3, num_sample=num_sample, distill_weight=0.0,
                  lr=1e-4, progress=False, log=None)
    assert seen == [(3 * num_sample, 3, 8, 32, 32)] * 2


def test_num_sample_is_refused_for_image_data():
    from torch.utils.data import TensorDataset

    model = vimtr.create_model("vim_tiny", depth=2, embed_dim=16, img_size=16, patch_size=8, num_classes=2)
    data = TensorDataset(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="num_sample=2.*video datasets"):
        train.retrain(model, data, epochs=1, batch_size=2, num_sample=2, progress=False, log=None)


def test_video_cutmix_cuts_one_spatial_box_through_all_frames():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 16, 16)
    cutmix = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, prob=1.0, num_classes=3)
    mixed, targets = recipe.mix(cutmix, x.clone(), torch.tensor([0, 1, 2, 0]))
    assert targets.shape == (4, 3)
    changed = mixed != x  # where the partner (the reversed batch) was pasted in
    assert changed.any()
    box = changed[0, 0, 0]
    for b in range(4):
        if not torch.equal(x[b], x.flip(0)[b]):
            assert torch.equal(changed[b], box.expand_as(changed[b]))  # same H x W box, every channel and frame
    ys, xs = box.nonzero(as_tuple=True)
    assert box.sum() == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)  # a rectangle
