import os
import pathlib

# The test process tunes itself as the CLI does (vimtr.cli.tune_cpu_threads; import vimtr never does):
# set before torch is first imported.
os.environ.setdefault("GOMP_SPINCOUNT", "30000")

import pytest
import torch
from safetensors.torch import load_file

GOLDEN = pathlib.Path(__file__).parent / "golden"


def golden_weights(case: str = "p1") -> dict:
    """Official-init Vim-Ti weights from the golden files (fp16 stored, cast to fp32); p1b adds overrides."""
    sd = {k[8:]: v.float() for k, v in load_file(GOLDEN / "p1_vim_tiny.safetensors").items()
          if k.startswith("weights.")}
    if case == "p1b":
        sd.update({k[8:]: v.float() for k, v in load_file(GOLDEN / "p1b_vim_tiny_perturbed.safetensors").items()
                   if k.startswith("weights.")})
    return sd


def assert_close_golden(ours: torch.Tensor, golden: torch.Tensor, what: str):
    """The golden README's check: |ours − golden| ≤ 1e-4 + 1e-4·|golden| elementwise."""
    assert ours.shape == golden.shape, f"{what}: shape {tuple(ours.shape)} != golden {tuple(golden.shape)}"
    bad = (ours - golden).abs() > 1e-4 + 1e-4 * golden.abs()
    assert not bad.any(), f"{what}: {int(bad.sum())} elements out of tolerance, max |diff| " \
                          f"{(ours - golden).abs().max().item():.3g}"


@pytest.fixture(scope="session")
def golden_input():
    return load_file(GOLDEN / "p1_vim_tiny.safetensors")["input"]


@pytest.fixture(scope="session")
def golden():
    return {case: load_file(GOLDEN / f"{stem}.safetensors") for case, stem in
            [("p1", "p1_vim_tiny"), ("p1b", "p1b_vim_tiny_perturbed"), ("p2", "p2_rmeeto_tiny_r11"),
             ("p2b", "p2b_rmeeto_tiny_r11_perturbed")]}


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of small tensors: faster than two, and on a machine whose cores are
    shared with other jobs, torch's threads otherwise spin against each other (many times slower)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def video_set(tmp_path_factory):
    """A Kinetics-layout folder of real video files, written with PyAV's encoder: 3 classes (moving digits
    0, 1, 2) × 2 train + 2 val clips of 24 frames at 64×96 (mp4; wide, so spatial crops differ), plus
    ``broken.mp4`` (random bytes) listed in ``val_broken.csv``. Returns write_moving_digits' dict with
    ``root`` and ``val_broken`` added."""
    pytest.importorskip("av", reason="video tests need PyAV: pip install 'vimtr[video]'")
    from vimtr.data.synthetic_video import write_moving_digits

    root = tmp_path_factory.mktemp("kinetics_like")
    info = write_moving_digits(root, classes=3, per_class=2, frames=24, size=64, width=96)
    broken = root / "videos" / "1" / "broken.mp4"
    broken.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                     dtype=torch.uint8).numpy().tobytes())
    (root / "val_broken.csv").write_text(info["val"].read_text() + "videos/1/broken.mp4,1\n")
    return {**info, "root": root, "val_broken": root / "val_broken.csv"}
