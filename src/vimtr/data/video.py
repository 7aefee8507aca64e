"""Video datasets in the layouts Kinetics users have, sampled and viewed as VideoMamba does.

Layouts (:func:`load_video_dataset`):

- an **annotation list** (VideoMamba's Kinetics loaders): one clip per line, ``path label`` separated by a
  comma or by spaces (``train.csv`` / ``val.csv`` / ``test.csv``); ``path frames label`` (raw-frame lists)
  is read too. A path names a video file (mp4, webm, mkv, ...) or a folder of extracted frames; a
  relative path is taken from ``root`` (VideoMamba's ``--prefix``), by default the list's own folder. A
  first line whose label is not a number is a header and skipped. Labels are class indices as the list
  gives them;
- a **folder** (the Kinetics download layout): one sub-folder per class holding its clips, each a video
  file or a folder of frames (``DIR/abseiling/xyz.mp4``, ``DIR/abseiling/xyz/img_00001.jpg``); classes are
  the sorted folder names (Kinetics' usual alphabetical index order). A folder holding ``train/`` /
  ``val/`` uses the split asked for.

Sampling (VideoMamba's ``_get_seq_frames``, "sparse"): the clip's ``n`` frames are cut into ``num_frames``
segments of ``(n − 1) / num_frames`` frames; training takes a random frame in each segment, evaluation
clip ``k`` of ``clips`` the frame at ``round(seg · i) + int(seg / (clips + 1) · (k + 1))``. **A clip with
fewer frames than asked is sampled with repetition** (the same rule: some frames are taken twice), as
VideoMamba does; a clip with no frame at all is unreadable.

Views (VideoMamba's test protocol): ``views=(clips, crops)`` gives each video ``clips × crops`` inputs
(e.g. 4×3 for K400), clip-major; :func:`vimtr.engine.evaluate.evaluate` averages the model's outputs
over them. One view gives a ``(3, T, S, S)`` tensor, several a ``(V, 3, T, S, S)`` one.

Unreadable clips (undecodable, no video stream): with ``on_corrupt="skip"`` a warning names the file and
the item is a :class:`vimtr.data.folders.Skipped` marker (the loaders drop it and report its name); with
``"fail"`` a :class:`~vimtr.errors.CorruptVideoError` names it. Layout mistakes are reported when the
dataset is built: a list naming a missing file, a malformed line, a frame folder without images.
"""
from __future__ import annotations

import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vimtr.data.folders import ON_CORRUPT, Skipped
from vimtr.data.video_decode import (FRAME_EXTENSIONS, VIDEO_EXTENSIONS, DecodeError, has_frames, is_video_file,
                                     open_clip)
from vimtr.errors import CorruptVideoError, CorruptVideoWarning, UsageError

VIDEO_LAYOUT_HINT = ("an annotation list (one 'path label' per line, comma- or space-separated, as VideoMamba's "
                     "train.csv/val.csv), or a folder with one sub-folder per class holding video files "
                     f"({', '.join(VIDEO_EXTENSIONS)}) or folders of extracted frames")
_MAX_LISTED = 5


@dataclass(frozen=True)
class Views:
    """The evaluation protocol: ``clips`` temporal clips × ``crops`` spatial crops per video."""
    clips: int = 1
    crops: int = 1

    @classmethod
    def parse(cls, spec) -> "Views":
        """``"4x3"``, ``(4, 3)`` or a Views; raises UsageError for anything else."""
        if isinstance(spec, Views):
            return spec
        try:
            if isinstance(spec, str):
                clips, crops = (int(v) for v in spec.lower().replace("×", "x").split("x"))
            else:
                clips, crops = (int(v) for v in spec)
        except (ValueError, TypeError):
            raise UsageError(f"test views must be CLIPSxCROPS (e.g. 4x3, or 1x1 for one centre view), got {spec!r}") \
                from None
        if clips < 1 or crops < 1:
            raise UsageError(f"test views need at least 1 clip and 1 crop, got {clips}x{crops}")
        return cls(clips, crops)

    @property
    def count(self) -> int:
        return self.clips * self.crops

    def __str__(self) -> str:
        return f"{self.clips}x{self.crops}"


# ---------------------------------------------------------------------------------------------- sampling
def segment_indices(num_video_frames: int, num_frames: int, clip: int | None = None, clips: int = 1,
                    rng: random.Random | None = None) -> list[int]:
    """VideoMamba's sparse sampling: ``num_frames`` indices into a clip of ``num_video_frames`` frames.

    ``clip=None``: training (a random frame per segment, from ``rng`` or python's global RNG); otherwise
    the deterministic frames of temporal clip ``clip`` out of ``clips``. Short clips repeat frames.
    """
    if num_video_frames < 1:
        raise ValueError(f"a clip needs at least one frame, got {num_video_frames}")
    seg = max(0.0, (num_video_frames - 1) / num_frames)
    last = num_video_frames - 1
    if clip is None:
        rand = rng or random
        return [min(rand.randint(int(np.round(seg * i)), int(np.round(seg * (i + 1)))), last)
                for i in range(num_frames)]
    offset = int(seg / (clips + 1) * (clip + 1))
    return [min(int(np.round(seg * i)) + offset, last) for i in range(num_frames)]


# ---------------------------------------------------------------------------------------------- layouts
def _resolve(text: str, base: Path) -> Path:
    p = Path(text).expanduser()
    return p if p.is_absolute() else base / p


def read_annotations(list_file, root=None) -> list[tuple[Path, int]]:
    """``(path, label)`` per line of a VideoMamba annotation list; raises UsageError naming bad lines and
    files that do not exist."""
    list_file = Path(list_file).expanduser()
    base = Path(root).expanduser() if root is not None else list_file.parent
    try:
        lines = list_file.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"annotation list {list_file}: cannot read it ({e})") from None
    samples, missing, bad = [], [], []
    first = True
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        header, first = first, False
        fields = [f.strip() for f in text.split(",")] if "," in text else text.split()
        try:
            if len(fields) not in (2, 3):
                raise ValueError
            label = int(fields[-1])
        except ValueError:
            if header and len(fields) in (2, 3):
                continue  # a header line ("path,label")
            bad.append(f"line {number}: {text!r}")
            continue
        if label < 0:
            bad.append(f"line {number}: negative label {label}")
            continue
        path = _resolve(fields[0], base)
        if not path.exists():
            missing.append(f"line {number}: {path}")
            continue
        samples.append((path, label))
    if bad:
        raise UsageError(f"annotation list {list_file}: {len(bad)} line(s) are not 'path label' (or 'path frames "
                         f"label') with an integer label >= 0: " + "; ".join(bad[:_MAX_LISTED]))
    if missing:
        raise UsageError(f"annotation list {list_file}: {len(missing)} listed clip(s) do not exist (paths are "
                         f"relative to {base}; set the root, VideoMamba's --prefix, if they are relative to "
                         f"another folder, or remove those lines): " + "; ".join(missing[:_MAX_LISTED]))
    if not samples:
        raise UsageError(f"annotation list {list_file} lists no clips; expected {VIDEO_LAYOUT_HINT}")
    return samples


def scan_class_folders(root: Path) -> tuple[list[tuple[Path, int]], list[str]]:
    """(samples, class names) of a Kinetics-layout folder: class sub-folders holding clips."""
    classes = sorted(e.name for e in root.iterdir() if e.is_dir())
    samples = []
    for index, name in enumerate(classes):
        for entry in sorted((root / name).iterdir()):
            if entry.is_dir() or is_video_file(entry):
                samples.append((entry, index))
    if not samples:
        raise UsageError(f"video folder {root} holds no clips; expected {VIDEO_LAYOUT_HINT}")
    return samples, classes


def _check_frame_folders(samples):
    """Report every frame folder without images now, not as a crash deep inside an epoch."""
    empty = [str(p) for p, _ in samples if p.is_dir() and not has_frames(p)]
    if empty:
        raise UsageError(f"{len(empty)} frame folder(s) hold no images ({', '.join(FRAME_EXTENSIONS)}): "
                         + "; ".join(empty[:_MAX_LISTED]) + "; extract their frames or list the video files")


# ---------------------------------------------------------------------------------------------- the dataset
class VideoClips(Dataset):
    """Clips (video files or frame folders) with labels, decoded, sampled and preprocessed on access.

    ``mode="eval"``: the ``views`` protocol; ``mode="train"``: random segment sampling and ``augment`` (a
    :class:`~vimtr.data.video_transforms.ClipAugment`, or None for the evaluation preprocessing of a random
    clip), ``num_sample`` augmented clips per access (VideoMamba's ``--num_sample``: a ``(num_sample, 3, T,
    S, S)`` tensor). Items are ``(tensor, label)`` or a :class:`Skipped` marker.
    """

    is_video = True

    def __init__(self, samples, num_frames: int, size: int, *, views=Views(), mode: str = "eval",
                 on_corrupt: str = "skip", classes=None, root=None, augment=None, num_sample: int = 1):
        if on_corrupt not in ON_CORRUPT:
            raise UsageError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        if mode not in ("eval", "train"):
            raise UsageError(f"mode must be 'eval' or 'train', got {mode!r}")
        if not isinstance(num_frames, int) or num_frames < 1:
            raise UsageError(f"num_frames must be a positive integer, got {num_frames!r}")
        if not isinstance(num_sample, int) or num_sample < 1:
            raise UsageError(f"num_sample must be a positive integer, got {num_sample!r}")
        self.samples = [(Path(p), int(y)) for p, y in samples]
        self.targets = [y for _, y in self.samples]
        self.num_frames, self.size, self.views, self.mode = num_frames, int(size), Views.parse(views), mode
        self.on_corrupt, self.augment, self.num_sample = on_corrupt, augment, num_sample
        if classes is not None:
            self.classes = list(classes)
        self.root = str(root) if root is not None else "videos"

    def __len__(self):
        return len(self.samples)

    @property
    def label_count(self) -> int:
        """Classes the labels need: the folder's class count, or the largest listed label + 1."""
        return len(self.classes) if hasattr(self, "classes") else max(self.targets) + 1

    def protocol(self) -> dict:
        """What a results file records about how the clips were read."""
        out = {"kind": "video", "num_frames": self.num_frames, "size": self.size, "short_side": self.size,
               "sampling": "sparse segments (VideoMamba _get_seq_frames; short clips repeat frames)",
               "mode": self.mode}
        if self.mode == "eval":
            out.update(test_views=str(self.views), temporal_clips=self.views.clips, spatial_crops=self.views.crops,
                       spatial="short side resized (bilinear), crops of the short side along the long side")
        else:
            out.update(num_sample=self.num_sample, augment=self.augment is not None)
        return out

    def for_training(self, augment=None, num_sample: int = 1) -> "VideoClips":
        """The same clips read for training (random segments, ``augment``, ``num_sample`` per access)."""
        return VideoClips(self.samples, self.num_frames, self.size, mode="train", on_corrupt=self.on_corrupt,
                          classes=getattr(self, "classes", None), root=self.root, augment=augment,
                          num_sample=num_sample)

    def __getitem__(self, index):
        path, label = self.samples[index]
        try:
            return self._load(path), label
        except DecodeError as e:
            if self.on_corrupt == "fail":
                raise CorruptVideoError(f"{e}; replace or delete the file (or its line in the list), or pass "
                                        f"--on-corrupt skip to skip and count unreadable clips") from None
            warnings.warn(f"{e}; skipped", CorruptVideoWarning, stacklevel=2)
            return Skipped(str(path))

    def _load(self, path: Path) -> torch.Tensor:
        from vimtr.data.video_transforms import eval_views

        reader = open_clip(path)
        n = len(reader)
        if self.mode == "train":
            clips = []
            for _ in range(self.num_sample):
                frames = reader.frames(segment_indices(n, self.num_frames))
                if self.augment is not None:
                    clips.append(self.augment(frames))
                else:
                    clips.append(eval_views(frames, self.size, 1)[0])
            return clips[0] if self.num_sample == 1 else torch.stack(clips)
        per_clip = [segment_indices(n, self.num_frames, k, self.views.clips) for k in range(self.views.clips)]
        union = sorted({i for idx in per_clip for i in idx})
        decoded = reader.frames(union)  # one decode pass for every view
        where = {i: j for j, i in enumerate(union)}
        views = []
        for idx in per_clip:
            views.extend(eval_views(decoded[[where[i] for i in idx]], self.size, self.views.crops))
        return views[0] if len(views) == 1 else torch.stack(views)


# ---------------------------------------------------------------------------------------------- building
def load_video_dataset(spec, split: str = "val", *, num_frames: int, size: int, views=Views(),
                       on_corrupt: str = "skip", root=None) -> VideoClips:
    """A :class:`VideoClips` (evaluation mode; ``.for_training()`` for training) from a list file or a folder.

    ``spec``: an annotation list or a Kinetics-layout folder (``split`` picks ``train/`` or ``val/`` inside
    it when present); ``root``: where a list's relative paths start (default: the list's folder).
    ``num_frames``/``size``: what the model takes (``model.num_frames``, ``model.patch_embed.img_size``).
    """
    path = Path(spec).expanduser()
    if path.is_file():
        samples, classes, label = read_annotations(path, root), None, path
    elif path.is_dir():
        folder = path / split if (path / split).is_dir() else path
        samples, classes = scan_class_folders(folder)
        label = folder
    else:
        raise UsageError(f"video data {str(path)!r} does not exist; expected {VIDEO_LAYOUT_HINT}")
    _check_frame_folders(samples)
    if any(is_video_file(p) for p, _ in samples):
        from vimtr.data.video_decode import require_av
        require_av()  # say how to install the decoder now, not from inside a loader worker
    return VideoClips(samples, num_frames, size, views=views, on_corrupt=on_corrupt, classes=classes, root=label)


def is_video_model(model) -> bool:
    return hasattr(model, "temporal_pos_embedding")


def model_geometry(model) -> tuple[int, int]:
    """(frames, frame size) a video model takes."""
    h, w = model.patch_embed.img_size
    if h != w:
        raise UsageError(f"video preprocessing makes square frames; the model takes {h}x{w}")
    return model.num_frames, h


def check_video_data(model, dataset, what: str = "video data"):
    """The model must be a video model taking the dataset's frames, with a head covering every label."""
    if not is_video_model(model):
        raise UsageError(f"{what} {dataset.root!r} holds video clips but {getattr(model, 'model_name', 'the model')} "
                         f"is an image model; use a videomamba_video_* model (or an image dataset)")
    frames, size = model_geometry(model)
    if dataset.num_frames != frames or dataset.size != size:
        raise UsageError(f"{what} {dataset.root!r} is read as {dataset.num_frames} frames of {dataset.size} px but the "
                         f"model takes {frames} frames of {size} px; use --num-frames {frames} (or a checkpoint "
                         f"trained for {dataset.num_frames} frames)")
    head = getattr(model, "num_classes", None)
    if head and dataset.label_count > head:
        bad = [(p, y) for p, y in dataset.samples if y >= head][:_MAX_LISTED]
        raise UsageError(f"{what} {dataset.root!r}: label(s) outside the model's {head} classes (0..{head - 1}): "
                         + "; ".join(f"{p} has label {y}" for p, y in bad)
                         + "; use the class indices the checkpoint was trained with")
    if hasattr(dataset, "classes") and head and len(dataset.classes) != head:
        raise UsageError(f"{what} {dataset.root!r} has {len(dataset.classes)} class folders but the model's head has "
                         f"{head} outputs; use the dataset the checkpoint was trained on (K400: 400 classes)")
