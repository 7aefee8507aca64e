"""Reading clips: video files decoded with PyAV (FFmpeg bindings), extracted-frame folders with Pillow.

A clip is opened as a :class:`ClipReader`: ``len(reader)`` frames, ``reader.frames(indices)`` the RGB
frames at those indices as one ``(n, H, W, 3)`` uint8 array (indices may repeat). Anything that cannot be
read raises :class:`DecodeError` naming the file; the datasets turn it into a skip or a clear failure.

Video files: the frame count comes from the container (``stream.frames``) or, where the container does not
record it (some WebM/MKV), from counting the video packets; frames are decoded in order up to the last
index needed, with FFmpeg's own threads. A container that promises more frames than it decodes (a cut
download) gives its last decoded frame for the missing indices, as a reader that clamps would.

PyAV is an optional dependency (``pip install 'vimtr[video]'``); it is imported on first use.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

from vimtr.errors import UsageError

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg")
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class DecodeError(Exception):
    """A clip that cannot be read (the message names the file and the decoder's reason)."""


def require_av():
    """The ``av`` module, or a UsageError saying how to install it."""
    try:
        import av
    except ImportError:
        raise UsageError("decoding video files needs PyAV (FFmpeg bindings): pip install 'vimtr[video]' "
                         "(or pip install av); folders of extracted frames need no extra package") from None
    return av


def is_video_file(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_EXTENSIONS


def _natural_key(name: str):
    """img_2.jpg before img_10.jpg, whether or not the numbers are zero-padded."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def frame_files(folder: Path) -> list[str]:
    """The frame images in ``folder``, in natural order (names only)."""
    with os.scandir(folder) as it:
        names = [e.name for e in it if e.name.lower().endswith(FRAME_EXTENSIONS) and e.is_file()]
    return sorted(names, key=_natural_key)


def has_frames(folder: Path) -> bool:
    """Whether ``folder`` holds at least one frame image (stops at the first)."""
    with os.scandir(folder) as it:
        return any(e.name.lower().endswith(FRAME_EXTENSIONS) for e in it)


class ClipReader:
    """Common interface; use :func:`open_clip`."""

    path: Path

    def __len__(self) -> int:
        raise NotImplementedError

    def frames(self, indices: Sequence[int]) -> np.ndarray:
        raise NotImplementedError


class FrameFolderReader(ClipReader):
    """A folder of extracted frames (``img_00001.jpg`` ...), one image per frame, in natural name order."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.names = frame_files(path)
        except OSError as e:
            raise DecodeError(f"{path}: cannot list the frame folder ({e})") from None
        if not self.names:
            # A layout mistake, not a damaged file: reported as bad input wherever it is found.
            raise UsageError(f"frame folder {path} holds no images ({', '.join(FRAME_EXTENSIONS)}); a clip folder "
                             f"needs its extracted frames, or list the video file instead")

    def __len__(self) -> int:
        return len(self.names)

    def frames(self, indices: Sequence[int]) -> np.ndarray:
        from PIL import Image

        cache = {}
        for i in dict.fromkeys(indices):
            name = self.names[i]
            try:
                with Image.open(self.path / name) as img:
                    cache[i] = np.asarray(img.convert("RGB"))
            except (OSError, ValueError, SyntaxError) as e:
                raise DecodeError(f"{self.path / name}: cannot decode frame ({type(e).__name__}: {e})") from None
        shapes = {a.shape for a in cache.values()}
        if len(shapes) > 1:
            raise DecodeError(f"{self.path}: frames of different sizes {sorted(shapes)}")
        return np.stack([cache[i] for i in indices])


class VideoFileReader(ClipReader):
    """A video file (mp4, webm, mkv, ...) decoded with PyAV."""

    def __init__(self, path: Path):
        self.path = path
        self.av = require_av()
        self.count = self._count()

    def _open(self):
        av = self.av
        try:
            container = av.open(str(self.path))
        except (av.FFmpegError, OSError, ValueError, EOFError) as e:
            raise DecodeError(f"{self.path}: cannot open the video ({type(e).__name__}: {e})") from None
        if not container.streams.video:
            container.close()
            raise DecodeError(f"{self.path}: the file has no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # FFmpeg's frame/slice threads: decoding keeps up with the model
        return container, stream

    def _count(self) -> int:
        container, stream = self._open()
        try:
            n = int(stream.frames or 0)
            if n <= 0:  # not recorded by the container: count the packets (no decoding)
                n = sum(1 for p in container.demux(stream) if p.size)
        except (self.av.FFmpegError, OSError, ValueError, EOFError) as e:
            raise DecodeError(f"{self.path}: cannot read the video ({type(e).__name__}: {e})") from None
        finally:
            container.close()
        if n <= 0:
            raise DecodeError(f"{self.path}: the video has no frames")
        return n

    def __len__(self) -> int:
        return self.count

    def frames(self, indices: Sequence[int]) -> np.ndarray:
        wanted = set(indices)
        last = max(wanted)
        got, prev, prev_i = {}, None, -1
        container, stream = self._open()
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    got[i] = frame.to_ndarray(format="rgb24")
                prev, prev_i = frame, i
                if i >= last:
                    break
        except (self.av.FFmpegError, OSError, ValueError, EOFError) as e:
            raise DecodeError(f"{self.path}: cannot decode the video ({type(e).__name__}: {e})") from None
        finally:
            container.close()
        if prev is None:
            raise DecodeError(f"{self.path}: no frame could be decoded")
        if prev_i < last:  # fewer frames than the container promised: clamp to the last decoded one
            tail = got.get(prev_i)
            if tail is None:
                tail = prev.to_ndarray(format="rgb24")
            for i in wanted:
                if i > prev_i:
                    got[i] = tail
        return np.stack([got[i] for i in indices])


def open_clip(path: Path) -> ClipReader:
    """A reader for a video file or a frame folder; raises DecodeError (unreadable) or UsageError (layout)."""
    path = Path(path)
    if path.is_dir():
        return FrameFolderReader(path)
    return VideoFileReader(path)
