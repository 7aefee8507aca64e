"""Video data on real files: decoding (PyAV, frame folders), VideoMamba's sparse sampling and test views,
annotation lists and Kinetics-layout folders, corrupt files, and the bad-input errors."""
import random
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from vimtr.data import video
from vimtr.data.folders import Skipped, collate_skip, seeded_rng
from vimtr.data.synthetic_video import moving_digit, write_video
from vimtr.data.video_decode import open_clip
from vimtr.data.video_transforms import ClipAugment, crop_starts, eval_views, resize_short_side
from vimtr.errors import CorruptVideoError, CorruptVideoWarning, UsageError

av = pytest.importorskip("av", reason="video tests need PyAV: pip install 'vimtr[video]'")


# ---------------------------------------------------------------------------------------------- sampling
def test_eval_sampling_is_videomamba_get_seq_frames():
    # n = 30, 8 frames: seg = 29/8 = 3.625; round(3.625 i) = 0 4 7 11 14 18 22 25 (numpy rounds half to even);
    # 1 clip: offset int(3.625 / 2) = 1; clip k of 4: offset int(3.625 / 5 * (k + 1)) = 0, 1, 2, 2
    assert video.segment_indices(30, 8, 0, 1) == [1, 5, 8, 12, 15, 19, 23, 26]
    assert [video.segment_indices(30, 8, k, 4)[0] for k in range(4)] == [0, 1, 2, 2]
    assert video.segment_indices(30, 8, 3, 4) == [2, 6, 9, 13, 16, 20, 24, 27]


def test_short_clips_repeat_frames_as_videomamba():
    """A clip shorter than the frames asked for is sampled with repetition (documented), never refused."""
    # n = 3: seg = 2/8 = 0.25, round(0.25 i) = 0 0 0 1 1 1 2 2 (0.5 -> 0, 1.5 -> 2), offset int(0.125) = 0
    assert video.segment_indices(3, 8, 0, 1) == [0, 0, 0, 1, 1, 1, 2, 2]
    assert video.segment_indices(1, 8, 0, 1) == [0] * 8
    with pytest.raises(ValueError, match="at least one frame"):
        video.segment_indices(0, 8, 0, 1)


@pytest.mark.parametrize("n,frames", [(300, 8), (30, 16), (5, 8), (64, 64)])
def test_training_sampling_takes_one_frame_per_segment(n, frames):
    rng = random.Random(0)
    seg = max(0.0, (n - 1) / frames)
    for _ in range(50):
        idx = video.segment_indices(n, frames, rng=rng)
        assert len(idx) == frames and idx == sorted(idx) and 0 <= idx[0] and idx[-1] <= n - 1
        for i, j in enumerate(idx):
            assert round(seg * i) - 1 <= j <= round(seg * (i + 1)) + 1


# ---------------------------------------------------------------------------------------------- decoding
@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".mkv"])
def test_decodes_each_container_frame_exactly_in_count_and_close_in_value(tmp_path, suffix):
    frames = moving_digit(np.eye(8) * 16, 10, 32, np.random.default_rng(0))
    reader = open_clip(write_video(tmp_path / f"clip{suffix}", frames))
    assert len(reader) == 10
    got = reader.frames([9, 0, 0, 4])
    assert got.shape == (4, 32, 32, 3) and got.dtype == np.uint8
    for k, i in enumerate([9, 0, 0, 4]):  # lossy codecs: close, not equal
        assert np.abs(got[k].astype(int) - frames[i]).mean() < 8


def test_frame_folder_reads_frames_in_natural_order(tmp_path):
    frames = moving_digit(np.eye(8) * 16, 12, 32, np.random.default_rng(1))
    for t, f in enumerate(frames):  # unpadded names: img_10 must come after img_9
        Image.fromarray(f).save(tmp_path / f"img_{t + 1}.png")
    reader = open_clip(tmp_path)
    assert len(reader) == 12
    assert np.array_equal(reader.frames([11, 1, 9]), frames[[11, 1, 9]])  # PNG: lossless


def test_missing_pyav_names_the_extra(monkeypatch, video_set, tmp_path):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(UsageError, match=r"pip install 'vimtr\[video\]'"):
        video.load_video_dataset(video_set["val"], num_frames=8, size=32)  # said when the data is opened
    frames = tmp_path / "cls" / "clip"  # frame folders need no decoder
    frames.mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(frames / "img_1.png")
    assert video.load_video_dataset(tmp_path, num_frames=2, size=16)[0][0].shape == (3, 2, 16, 16)


# ---------------------------------------------------------------------------------------------- transforms
def test_resize_short_side_and_crop_positions():
    frames = np.zeros((2, 48, 80, 3), np.uint8)
    assert resize_short_side(frames, 24).shape == (2, 3, 24, 40)  # long side int(24 * 80 / 48)
    assert resize_short_side(np.zeros((1, 90, 50, 3), np.uint8), 32).shape == (1, 3, 57, 32)
    assert crop_starts(40, 24, 3) == [0, 8, 16] and crop_starts(40, 24, 1) == [8] and crop_starts(41, 24, 2) == [0, 17]


def test_eval_views_are_crops_of_one_resized_clip():
    rng = np.random.default_rng(2)
    frames = rng.integers(0, 256, (4, 32, 48, 3), dtype=np.uint8)  # already short side 32: no resize
    views = eval_views(frames, 32, 3)
    assert [tuple(v.shape) for v in views] == [(3, 4, 32, 32)] * 3
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None, None]
    for v, start in zip(views, [0, 8, 16]):
        raw = torch.from_numpy(frames[:, :, start:start + 32]).permute(3, 0, 1, 2).float() / 255
        torch.testing.assert_close(v, (raw - mean) / std)


def test_training_augmentation_is_one_transform_per_clip_and_seeded():
    frame = np.random.default_rng(3).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    frames = np.stack([frame] * 6)
    aug = ClipAugment(32, auto_augment="rand-m9-n3-mstd0.5-inc1", reprob=0.0)
    with seeded_rng(7):
        a = aug(frames)
    with seeded_rng(7):
        b = aug(frames)
    assert a.shape == (3, 6, 32, 32) and torch.equal(a, b)
    for t in range(1, 6):  # identical frames stay identical: RandAugment, crop and flip are per clip
        assert torch.equal(a[:, t], a[:, 0])
    with seeded_rng(8):
        assert not torch.equal(aug(frames), a)


# ---------------------------------------------------------------------------------------------- layouts
def test_list_file_and_folder_layouts_agree(video_set):
    from_list = video.load_video_dataset(video_set["val"], num_frames=8, size=32)
    assert len(from_list) == 6 and from_list.targets == [0, 0, 1, 1, 2, 2] and from_list.label_count == 3
    folder = video.load_video_dataset(video_set["videos"], num_frames=8, size=32)
    assert folder.classes == ["0", "1", "2"] and len(folder) == 13  # 12 clips + broken.mp4
    x, y = from_list[0]
    assert x.shape == (3, 8, 32, 32) and y == 0
    by_path = dict(folder.samples)
    assert by_path[from_list.samples[0][0]] == 0


def test_list_syntax_header_spaces_three_columns_and_root(video_set, tmp_path):
    root = video_set["root"]
    (tmp_path / "a.txt").write_text("path label\n\nvideos/0/clip_0.mp4 0\n# comment\nvideos/2/clip_1.mp4 12 2\n")
    ds = video.load_video_dataset(tmp_path / "a.txt", num_frames=4, size=32, root=root)
    assert [(p.name, y) for p, y in ds.samples] == [("clip_0.mp4", 0), ("clip_1.mp4", 2)]


def test_list_naming_a_missing_video_is_a_clear_error(video_set, tmp_path):
    lst = tmp_path / "l.csv"
    lst.write_text(f"{video_set['root']}/videos/0/clip_0.mp4,0\n{video_set['root']}/videos/0/gone.mp4,0\n")
    with pytest.raises(UsageError, match=r"1 listed clip\(s\) do not exist.*line 2: .*gone\.mp4"):
        video.load_video_dataset(lst, num_frames=8, size=32)


@pytest.mark.parametrize("line,match", [("clip.mp4", "not 'path label'"), ("clip.mp4,x\nclip.mp4,cat", "line 2"),
                                        ("clip.mp4,-1", "negative label -1")])
def test_malformed_list_lines_are_named(tmp_path, line, match):
    (tmp_path / "clip.mp4").write_bytes(b"")
    (tmp_path / "l.csv").write_text(line + "\n")
    with pytest.raises(UsageError, match=match):
        video.read_annotations(tmp_path / "l.csv")


def test_frame_folder_without_images_is_a_clear_error(tmp_path):
    (tmp_path / "cls" / "clip_a").mkdir(parents=True)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "cls" / "clip_a" / "img_1.jpg")
    (tmp_path / "cls" / "clip_empty").mkdir()
    (tmp_path / "cls" / "clip_empty" / "notes.txt").write_text("no frames here")
    with pytest.raises(UsageError, match=r"1 frame folder\(s\) hold no images.*clip_empty"):
        video.load_video_dataset(tmp_path, num_frames=8, size=16)


def test_nonexistent_data_is_a_clear_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist; expected an annotation list"):
        video.load_video_dataset(tmp_path / "nope.csv", num_frames=8, size=32)


# ---------------------------------------------------------------------------------------------- corrupt files
def test_corrupt_video_is_named_and_skipped_or_fails(video_set):
    ds = video.load_video_dataset(video_set["val_broken"], num_frames=8, size=32)
    broken = len(ds) - 1
    with pytest.warns(CorruptVideoWarning, match="broken.mp4"):
        item = ds[broken]
    assert item == Skipped(str(video_set["videos"] / "1" / "broken.mp4"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptVideoWarning)
        x, y, skipped = collate_skip([ds[0], ds[broken], ds[1]])
    assert x.shape == (2, 3, 8, 32, 32) and y.tolist() == [0, 0] and skipped == [item.path]
    strict = video.load_video_dataset(video_set["val_broken"], num_frames=8, size=32, on_corrupt="fail")
    with pytest.raises(CorruptVideoError, match=r"broken\.mp4.*--on-corrupt skip"):
        strict[broken]


# ---------------------------------------------------------------------------------------------- views
def test_multi_view_items_are_the_single_views_in_clip_major_order(video_set):
    multi = video.load_video_dataset(video_set["val"], num_frames=4, size=48, views="3x2")
    x, _ = multi[2]
    assert x.shape == (6, 3, 4, 48, 48)
    path = multi.samples[2][0]
    reader = open_clip(path)
    for k in range(3):
        frames = reader.frames(video.segment_indices(len(reader), 4, k, 3))
        for c, view in enumerate(eval_views(frames, 48, 2)):
            assert torch.equal(x[k * 2 + c], view)
    assert not torch.equal(x[0], x[1]) and not torch.equal(x[0], x[2])  # another crop, another clip


def test_views_parse():
    assert video.Views.parse("4x3") == video.Views(4, 3) and str(video.Views.parse((2, 1))) == "2x1"
    for bad in ("4", "0x3", "ax3", "4x3x1"):
        with pytest.raises(UsageError, match="CLIPSxCROPS|at least 1"):
            video.Views.parse(bad)
