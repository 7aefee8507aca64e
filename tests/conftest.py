"""Shared test helpers: the golden files, tiny models, selective-scan inputs, image folders, subprocess
runs, and the one-thread fixture. Test modules import helpers from here (``from conftest import ...``),
never from each other. ``@pytest.mark.slow`` marks the long tests (``pytest -m "not slow"`` skips them)."""
import os
import pathlib
import signal
import subprocess

# The test process tunes itself as the CLI does (vimtr.cli.tune_cpu_threads; import vimtr never does):
# set before torch is first imported.
os.environ.setdefault("GOMP_SPINCOUNT", "30000")

import numpy as np
import pytest
import torch
from PIL import Image
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


# ------------------------------------------------------------------------------------------ models
TINY = dict(depth=2, embed_dim=32, img_size=32, patch_size=8, num_classes=4)


def tiny_model(seed=0, **kw):
    """A 2-block Vim-Ti-shaped model on 32 px images, 4 classes, seeded (overrides in ``kw``)."""
    import vimtr

    torch.manual_seed(seed)
    return vimtr.create_model("vim_tiny", **{**TINY, **kw})


def save_ckpt(model, path):
    """A vimtr checkpoint of ``model`` (record + state dict) at ``path``."""
    from vimtr.engine import checkpoints

    checkpoints.save({"vimtr": checkpoints.vimtr_record(model), "model": checkpoints.state_dict(model)}, path)
    return path


# ------------------------------------------------------------------------------------ scan inputs
def scan_inputs(b, e, l, n, dtype=torch.float32, seed=0, layout="contiguous"):
    """Random selective-scan inputs shaped like Vim's (A = -exp(·) < 0, Δ bias around softplus⁻¹ of small
    values). ``layout``: "contiguous"; "channel_last" makes u, delta and z transposed (B, L, E) views and
    B, C slices of one (B, L, 2N) projection, as the reference mixer produces them; "channel_major" stores
    u, delta and z as (E, B, L), the CPU mixer's layout."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    if layout == "channel_major":
        return dict(u=r(e, b, l).transpose(0, 1), delta=r(e, b, l).transpose(0, 1) * 0.5,
                    A=-torch.exp(r(e, n) * 0.5), B=r(b, n, l), C=r(b, n, l), D=r(e),
                    z=r(e, b, l).transpose(0, 1), delta_bias=r(e) * 0.5 - 1)
    if layout == "channel_last":
        u, delta, z = (r(b, l, e).transpose(1, 2) for _ in range(3))
        bc = r(b, l, 2 * n + 3)
        B, C = bc[..., 3:3 + n].transpose(1, 2), bc[..., 3 + n:].transpose(1, 2)
    elif layout == "contiguous":
        u, delta, z, B, C = r(b, e, l), r(b, e, l), r(b, e, l), r(b, n, l), r(b, n, l)
    else:
        raise ValueError(f"layout must be contiguous, channel_last or channel_major, got {layout!r}")
    A = -torch.exp(r(e, n) * 0.5)  # A = -exp(A_log) < 0, as in every Mamba
    return {"u": u, "delta": delta * 0.5, "A": A, "B": B, "C": C, "D": r(e), "z": z, "delta_bias": r(e) * 0.5 - 1.0}


# ------------------------------------------------------------------------------- data and processes
def write_folder(root, per_class, classes=4, seed=0, size=32):
    """ImageFolder of PNGs: class c has a bright quadrant c (learnable), on noise."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"n{c:08d}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = rng.integers(0, 80, (size, size, 3), dtype=np.uint8)
            r, q = divmod(c % 4, 2)
            h = size // 2
            a[r * h:(r + 1) * h, q * h:(q + 1) * h] += 150
            Image.fromarray(a).save(d / f"{i}.png")
    return root


def run_group(cmd, env, timeout):
    """Run a command in its own process group; on timeout kill the whole group (torchrun's workers too)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s:\n{out[-3000:]}") from None
    return proc.returncode, out


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


# videomamba_video_tiny at a size a CPU test affords: 2x2 patches x 8 frames + class token = 33 tokens.
SMALL_VIDEO = dict(depth=4, img_size=32, num_classes=3)


@pytest.fixture(scope="module")
def video_ckpt(tmp_path_factory):
    """A randomly initialised videomamba_video_tiny (:data:`SMALL_VIDEO`) in the official K400 format: a flat
    state dict, under the official file name (which says f8, res 32). Per module, as it seeds torch."""
    import vimtr

    torch.manual_seed(0)
    model = vimtr.create_model("videomamba_video_tiny", **SMALL_VIDEO)
    path = tmp_path_factory.mktemp("ckpt") / "videomamba_t16_k400_f8_res32.pth"
    torch.save(model.state_dict(), path)
    return path
