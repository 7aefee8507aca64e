"""``vimtr visualize`` on a clip: per-frame MTR importance in the model's frame-major token order, and the
spatio-temporal merge groups of each method."""
import argparse

import numpy as np
import pytest
import torch

import vimtr
from vimtr.tools import visualize, visualize_video
from vimtr.tools.visualize import _ImportanceProbe

pytest.importorskip("av", reason="video tests need PyAV: pip install 'vimtr[video]'")
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def small_video_model():
    torch.manual_seed(0)
    return vimtr.create_model("videomamba_video_tiny", depth=4, embed_dim=64, img_size=64, num_frames=4,
                              num_classes=3).eval()


def test_per_frame_importance_follows_the_frame_major_token_order():
    model = small_video_model()
    x = torch.randn(1, *model.input_size, generator=torch.Generator().manual_seed(1))
    imp = visualize_video.clip_importance(model, x, block=1)
    assert imp.shape == (4, 4, 4)  # frames, patch rows, patch columns
    probe = _ImportanceProbe(1)
    model.reducer = probe
    with torch.no_grad():
        model.forward_tokens(x)
    model.reducer = None
    score = probe.score[0]
    for t, h, w in [(0, 0, 0), (1, 2, 3), (3, 3, 0), (2, 1, 1)]:
        assert imp[t, h, w] == pytest.approx(score[1 + t * 16 + h * 4 + w].item())
    assert model.reducer is None


def test_clip_groups_partition_all_patches_of_all_frames():
    model = small_video_model()
    x = torch.randn(1, *model.input_size, generator=torch.Generator().manual_seed(2))
    groups, trace = visualize_video.clip_groups(model, x, "rmeeto", r=8)
    assert groups.shape == (4, 4, 4) and getattr(model, "reduction", None) is None
    assert set(np.unique(groups)) <= set(range(trace["tokens"][-1]))
    assert trace["tokens"][-1] == 65 - 8  # one merge event (block 2) in a 4-block model
    assert len(np.unique(groups)) == 64 - 8  # every merge joins two patches; the class token has none


def test_group_mean_frames_paints_groups_across_frames():
    frames = np.zeros((2, 4, 4, 3))
    frames[0] = 1.0  # frame 0 white, frame 1 black
    groups = np.array([[[0, 1], [2, 3]], [[0, 4], [5, 6]]])  # patch (0, 0) of both frames is one group
    out = visualize_video.group_mean_frames(frames, groups)
    assert np.allclose(out[0, :2, :2], 0.5) and np.allclose(out[1, :2, :2], 0.5)
    assert np.allclose(out[0, 2:, 2:], 1.0) and np.allclose(out[1, 2:, 2:], 0.0)


def test_visualize_cli_writes_the_clip_figure(video_set, tmp_path, capsys):
    model = vimtr.create_model("videomamba_video_tiny", depth=4, img_size=32, num_classes=3)
    torch.save(model.state_dict(), tmp_path / "vm.pth")
    parser = argparse.ArgumentParser(prog="vimtr")
    visualize.add_cli(parser.add_subparsers(dest="command"))
    clip = video_set["videos"] / "2" / "clip_0.mp4"
    out = tmp_path / "maps" / "clip.png"
    args = parser.parse_args(["visualize", str(clip), "--checkpoint", str(tmp_path / "vm.pth"), "--method", "rmeeto",
                              "mtr", "--flops-reduction", "0.2", "--out", str(out)])
    args.func(args)
    assert out.stat().st_size > 10_000 and "wrote" in capsys.readouterr().out
    from PIL import Image
    assert Image.open(out).size[0] > Image.open(out).size[1]  # one column per frame
