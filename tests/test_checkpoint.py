"""load_model: official / flat / DDP / safetensors / EMA / hub / bundled / vimtr checkpoints, inference, errors.

Checkpoints are generated here from small models, in the official Vim format (``save_official_checkpoint``);
only the golden P1 test uses a real size. Nothing touches the network.
"""
import argparse
import json
import logging
import os
import pickle
import sys
import warnings

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.layers import resample_abs_pos_embed
from timm.scheduler import CosineLRScheduler

import vimtr
from conftest import assert_close_golden, golden_weights
from vimtr.models import ALIASES
from vimtr.models import checkpoint as ckpt_mod
from vimtr.loading import load_model
from vimtr.models.checkpoint import CheckpointError, CheckpointWarning

OFFICIAL_NAME = {registered: official for official, registered in ALIASES.items()}  # vim_tiny -> timm name
SMALL = dict(depth=2, embed_dim=64, img_size=64)


# ------------------------------------------------------------------------------------------ helpers
def small(name="vim_tiny", seed=0, **overrides):
    torch.manual_seed(seed)
    return vimtr.create_model(name, **{**SMALL, **overrides}).eval()


def official_args(model_name, input_size=224, nb_classes=1000, **extra):
    """The argparse.Namespace hustvl/Vim main.py stores under 'args' (a few of its fields)."""
    return argparse.Namespace(model=model_name, input_size=input_size, nb_classes=nb_classes, drop_path=0.0,
                              epochs=300, lr=5e-4, output_dir="./output", **extra)


def save_official_checkpoint(model, path, args_model_name=None, ema_state=None, **extra_args):
    """Write ``model`` as hustvl/Vim ``main.py`` saves: model, model_ema, optimizer, lr_scheduler, epoch,
    scaler, args (an argparse.Namespace naming the official model)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    for p in model.parameters():  # zero gradients, no decay: a real AdamW step that leaves the weights untouched
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler = CosineLRScheduler(optimizer, t_initial=300, warmup_t=5, warmup_lr_init=1e-6)
    args = official_args(args_model_name or OFFICIAL_NAME.get(model.model_name, model.model_name),
                         input_size=model.patch_embed.img_size[0], nb_classes=model.num_classes, **extra_args)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": scheduler.state_dict(), "epoch": 299,
                "model_ema": model.state_dict() if ema_state is None else ema_state,
                "scaler": "none", "args": args}, path)
    return path


def image_input(model, batch=1, seed=1):
    torch.manual_seed(seed)
    return torch.randn(batch, *model.input_size)


def logits(model, x):
    with torch.no_grad():
        return model(x)


def assert_same_model(loaded, reference):
    """Same logits (a forward of each; used where the brief asks for logits)."""
    x = image_input(reference)
    assert torch.equal(logits(loaded, x), logits(reference, x))


def assert_same_weights(loaded, reference):
    """Same class, configuration and tensors: the cheap, exact check for the many variants."""
    assert type(loaded) is type(reference) and loaded.config == reference.config
    expected = reference.state_dict()
    got = loaded.state_dict()
    assert list(got) == list(expected) and all(torch.equal(got[k], expected[k]) for k in expected)


@pytest.fixture
def no_checkpoint_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        yield


class MaliciousSystem:
    """Unpickling calls os.system: the classic poisoned-checkpoint payload."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class MaliciousExec:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


# ------------------------------------------------------------------------------------------ round trips
def test_official_checkpoint_round_trip(tmp_path, no_checkpoint_warnings, caplog):
    model = small()
    path = save_official_checkpoint(model, tmp_path / "vim_t_midclstok_76p1acc.pth")
    with caplog.at_level(logging.INFO, logger="vimtr.models.checkpoint"):
        loaded = load_model(path)
    assert_same_model(loaded, model)
    assert not loaded.training and loaded.model_name == "vim_tiny"
    info = loaded.checkpoint_info
    assert info["file"] == str(path) and info["format"] == "official" and info["inferred"]
    assert info["name"] == "vim_tiny" and info["overrides"] == SMALL and info["notices"] == []
    assert info["description"] == "vim_tiny(depth=2, embed_dim=64, img_size=64)"
    assert "vim_tiny(depth=2, embed_dim=64, img_size=64)" in caplog.text

    named = load_model(path, name=OFFICIAL_NAME["vim_tiny"], **SMALL)  # the official alias works too
    assert_same_model(named, model)
    assert named.model_name == "vim_tiny" and not named.checkpoint_info["inferred"]


@pytest.mark.parametrize("variant", ["flat", "module_prefix", "safetensors", "in_memory"])
def test_state_dict_variants(tmp_path, variant):
    model = small()
    sd = model.state_dict()
    if variant == "flat":
        checkpoint = tmp_path / "weights.pth"
        torch.save(sd, checkpoint)
    elif variant == "module_prefix":  # saved from DistributedDataParallel
        checkpoint = tmp_path / "ddp.pth"
        torch.save({"model": {f"module.{k}": v for k, v in sd.items()}}, checkpoint)
    elif variant == "safetensors":
        checkpoint = tmp_path / "weights.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, checkpoint)
    else:
        checkpoint = sd
    with pytest.warns(CheckpointWarning, match="assuming Vim"):  # nothing says Vim or VideoMamba: notice
        loaded = load_model(checkpoint)
    assert_same_weights(loaded, model)
    assert loaded.checkpoint_info["name"] == "vim_tiny" and loaded.checkpoint_info["overrides"] == SMALL
    assert any("assuming Vim" in n for n in loaded.checkpoint_info["notices"])


def test_ema_weights(tmp_path):
    model, ema = small(seed=0), small(seed=1)
    path = save_official_checkpoint(model, tmp_path / "ckpt.pth", ema_state=ema.state_dict())
    from_ema = load_model(path, use_ema=True)
    assert_same_weights(from_ema, ema)
    assert from_ema.checkpoint_info["ema"]
    assert_same_weights(load_model(path), model)

    flat = tmp_path / "flat.pth"
    torch.save(model.state_dict(), flat)
    with pytest.raises(CheckpointError, match=r"flat\.pth.*use_ema=True.*no 'model_ema'"):
        load_model(flat, use_ema=True)


# ------------------------------------------------------------------------------------------ inference
FAMILY_CASES = {
    # id: (registered model, overrides on top of SMALL, how it is saved, expected name, expected overrides,
    #      expected class-token index)
    "vim_official": ("vim_tiny", {}, "official", "vim_tiny", SMALL, 8),
    "vim_d_state_chans_headless": ("vim_tiny", dict(embed_dim=32, d_state=8, in_chans=1, num_classes=0), "official",
                                   "vim_tiny", dict(SMALL, embed_dim=32, d_state=8, in_chans=1, num_classes=0), 8),
    "vim_128_is_not_stride": ("vim_tiny", dict(img_size=128), "flat", "vim_tiny", dict(SMALL, img_size=128), 32),
    "videomamba_official": ("videomamba_tiny", {}, "official", "videomamba_tiny", SMALL, 0),
    "videomamba_small": ("videomamba_small", dict(embed_dim=384), "official", "videomamba_small",
                         dict(depth=2, img_size=64), 0),
    "videomamba_by_file_name": ("videomamba_tiny", {}, "flat:videomamba_t16_in1k_res224.pth", "videomamba_tiny",
                                SMALL, 0),
    "vim_stride8_224": ("vim_tiny_stride8", dict(img_size=224), "flat", "vim_tiny_stride8",
                        dict(depth=2, embed_dim=64), 364),  # 27x27 at 224: stride 8
    "vim_stride8_args_input_size": ("vim_tiny_stride8", {}, "official", "vim_tiny_stride8", SMALL, 24),
    "video": ("videomamba_video_tiny", dict(img_size=32, num_frames=4, num_classes=10), "flat",
              "videomamba_video_tiny", dict(SMALL, img_size=32, num_frames=4, num_classes=10), 0),
    "video_tubelet2": ("videomamba_video_tiny", dict(img_size=32, num_frames=4, kernel_size=2), "flat",
                       "videomamba_video_tiny", dict(SMALL, img_size=32, num_frames=4, kernel_size=2), 0),
}


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_architecture_inference(tmp_path, case):
    name, overrides, how, expected_name, expected_overrides, cls_index = FAMILY_CASES[case]
    model = small(name, **overrides)
    if how == "official":
        path = save_official_checkpoint(model, tmp_path / "checkpoint.pth")
    else:
        path = tmp_path / (how.split(":")[1] if ":" in how else "weights.pth")
        torch.save(model.state_dict(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)  # flat files notice their assumed layout
        loaded = load_model(path)
    info = loaded.checkpoint_info
    assert (info["name"], info["overrides"]) == (expected_name, expected_overrides)
    assert loaded.initial_cls_index == cls_index and loaded.cls_position == model.cls_position
    assert_same_model(loaded, model)
    if how == "official" or how.startswith("flat:"):
        assert not any("assuming Vim" in n for n in info["notices"])
    if how.startswith("flat:"):
        assert any("file name" in n for n in info["notices"])


def test_inferred_overrides_are_minimal(tmp_path):
    """Registered sizes need no overrides; only what differs from the registry is reported."""
    model = small("videomamba_video_tiny", img_size=32, num_frames=16)
    torch.save(model.state_dict(), tmp_path / "videomamba_t16_k400_f16_res224.pth")
    loaded = load_model(tmp_path / "videomamba_t16_k400_f16_res224.pth")
    assert loaded.checkpoint_info["overrides"] == dict(SMALL, img_size=32, num_frames=16)
    assert loaded.num_frames == 16 and loaded.temporal_pos_embedding.shape[1] == 16


# ------------------------------------------------------------------------------------------ golden P1
def test_golden_p1_as_official_checkpoint(tmp_path, golden, golden_input, no_checkpoint_warnings):
    """The golden Vim-Ti weights, saved in the official format, reproduce the official logits."""
    weights = golden_weights("p1")
    path = tmp_path / "vim_t_midclstok_76p1acc.pth"
    # The official layout; the optimizer entry is a stand-in (building Vim-Ti just for AdamW costs ~1 s).
    torch.save({"model": weights, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "params": []}]},
                "lr_scheduler": {"t_initial": 300}, "epoch": 299, "model_ema": weights, "scaler": "none",
                "args": official_args(OFFICIAL_NAME["vim_tiny"])}, path)
    loaded = load_model(path)
    assert loaded.checkpoint_info["name"] == "vim_tiny" and loaded.checkpoint_info["overrides"] == {}
    # One thread: the reference scan is ~10k tiny ops, and two threads on a busy 2-core machine slow it
    # 10-30x (1 s → 30 s); the golden README measures 1 vs 2 threads as bit-identical.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = logits(loaded, golden_input)
    finally:
        torch.set_num_threads(threads)
    assert_close_golden(out, golden["p1"]["logits"], "logits")


# ------------------------------------------------------------------------------------------ bad input
def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.pth: no such file"):
        load_model(tmp_path / "nope.pth")
    with pytest.raises(CheckpointError, match="not a file"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="must be a file path"):
        load_model(42)


def test_unreadable_files(tmp_path):
    path = save_official_checkpoint(small(), tmp_path / "full.pth")
    data = path.read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.pth").write_text("these are not weights\n")
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 20)
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    torch.save({"epoch": 3, "args": argparse.Namespace(model="vim_tiny")}, tmp_path / "no_weights.pth")
    cases = {"truncated.pth": "truncated, corrupt", "notes.pth": "not a readable PyTorch checkpoint",
             "empty.pth": "empty file", "broken.safetensors": "not a readable safetensors file",
             "tensor.pth": "holds a Tensor", "no_weights.pth": "holds no weights"}
    for file, expected in cases.items():
        with pytest.raises(CheckpointError) as err:
            load_model(tmp_path / file)
        assert file in str(err.value) and expected in str(err.value), str(err.value)
        # No torch/pickle traceback chained below ours.
        assert err.value.__cause__ is None and (err.value.__context__ is None or err.value.__suppress_context__)


def test_wrong_shapes_name_the_keys_and_the_lookalike(tmp_path):
    path = save_official_checkpoint(small(), tmp_path / "tiny64.pth")
    with pytest.raises(CheckpointError) as err:
        load_model(path, name="vim_tiny", depth=2, img_size=64)  # width 192 expected, 64 stored
    msg = str(err.value)
    assert "tiny64.pth" in msg and "vim_tiny(depth=2, img_size=64)" in msg
    assert "cls_token: expected (1, 1, 192), found (1, 1, 64)" in msg
    assert "looks like vim_tiny(depth=2, embed_dim=64, img_size=64)" in msg
    assert msg.count("expected") <= 5 + 1  # at most five keys listed
    assert isinstance(err.value, ValueError)


def test_missing_and_unexpected_keys(tmp_path):
    sd = small().state_dict()
    del sd["layers.1.norm.weight"]
    sd["extra.weight"] = torch.zeros(3, 4)
    torch.save({"model": sd, "args": argparse.Namespace(model="vim_tiny")}, tmp_path / "edited.pth")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "edited.pth")
    msg = str(err.value)
    assert "edited.pth" in msg and "1 missing, 1 unexpected" in msg
    assert "layers.1.norm.weight: missing (expected (64,))" in msg
    assert "extra.weight: unexpected (found (3, 4))" in msg


def test_vit_checkpoint_is_recognised(tmp_path):
    vit = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32)  # timm's DeiT-Ti layout, 2 blocks
    torch.save({"model": vit.state_dict()}, tmp_path / "deit_tiny.pth")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "deit_tiny.pth")
    msg = str(err.value)
    assert "deit_tiny.pth" in msg and "Vision Transformer" in msg and "embed_dim 192, 2 blocks" in msg
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "deit_tiny.pth", name="vim_tiny")
    msg = str(err.value)
    assert "layers.0.mixer.A_log: missing (expected (384, 16))" in msg
    assert "blocks.0.norm1.weight: unexpected (found (192,))" in msg
    assert "looks like a Vision Transformer" in msg


def test_text_mamba_checkpoint_is_recognised(tmp_path):
    sd = {"backbone.embedding.weight": torch.zeros(1000, 64), "lm_head.weight": torch.zeros(1000, 64),
          "backbone.norm_f.weight": torch.ones(64)}
    for i in range(2):
        sd[f"backbone.layers.{i}.mixer.A_log"] = torch.zeros(128, 16)
        sd[f"backbone.layers.{i}.mixer.in_proj.weight"] = torch.zeros(256, 64)
        sd[f"backbone.layers.{i}.norm.weight"] = torch.ones(64)
    save_file(sd, tmp_path / "mamba-130m.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_model(tmp_path / "mamba-130m.safetensors")
    msg = str(err.value)
    assert "mamba-130m.safetensors" in msg and "text Mamba language model" in msg and "2 layers" in msg


def test_named_model_with_the_other_class_token_layout_warns(tmp_path):
    path = save_official_checkpoint(small("vim_tiny"), tmp_path / "vim.pth")
    with pytest.warns(CheckpointWarning, match="puts the class token middle, but videomamba_tiny puts it first"):
        load_model(path, name="videomamba_tiny", **SMALL)


def test_unknown_name(tmp_path):
    path = save_official_checkpoint(small(), tmp_path / "ckpt.pth")
    with pytest.raises(CheckpointError, match="Did you mean vim_tiny"):
        load_model(path, name="vim_tinyy")


@pytest.mark.parametrize("payload", ["torch_save_os_system", "raw_pickle_exec_p2", "raw_pickle_exec_p4"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, payload):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    if payload == "torch_save_os_system":
        torch.save({"model": small().state_dict(), "args": MaliciousSystem(marker)}, path)
        wanted = "system"
    else:
        with open(path, "wb") as f:
            pickle.dump({"model": {}, "x": MaliciousExec(marker)}, f, protocol=int(payload[-1]))
        wanted = "exec"
    with pytest.raises(CheckpointError) as err:
        load_model(path)
    msg = str(err.value)
    assert "evil.pth" in msg and "refused" in msg and wanted in msg and "was run" in msg
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ adapting weights
@pytest.mark.parametrize("name, new_size, cls_old, cls_new", [
    ("vim_tiny", 96, 8, 18),  # middle class token: row M//2 moves to M'//2
    ("videomamba_tiny", 96, 0, 0),  # class token first
])
def test_pos_embed_interpolation_keeps_class_row(tmp_path, name, new_size, cls_old, cls_new):
    model = small(name)
    path = save_official_checkpoint(model, tmp_path / "ckpt.pth")
    loaded = load_model(path, img_size=new_size)
    old, new = model.pos_embed.detach(), loaded.pos_embed.detach()
    assert new.shape == (1, (new_size // 16) ** 2 + 1, 64)
    assert torch.equal(new[:, cls_new], old[:, cls_old])
    old_rows = torch.cat((old[:, :cls_old], old[:, cls_old + 1:]), dim=1)
    new_rows = torch.cat((new[:, :cls_new], new[:, cls_new + 1:]), dim=1)
    expected = resample_abs_pos_embed(old_rows, new_size=[new_size // 16] * 2, num_prefix_tokens=0,
                                      interpolation="bicubic", antialias=False)
    assert torch.allclose(new_rows, expected)
    assert loaded.checkpoint_info["overrides"]["img_size"] == new_size
    assert any("pos_embed resampled" in n for n in loaded.checkpoint_info["notices"])
    assert logits(loaded, image_input(loaded, batch=1)).shape == (1, 1000)


def test_pos_embed_interpolation_stride8_class_row(tmp_path):
    model = small("vim_tiny_stride8", img_size=224)  # 27x27 grid, class row 364
    args = argparse.Namespace(model=OFFICIAL_NAME["vim_tiny_stride8"])
    torch.save({"model": model.state_dict(), "args": args}, tmp_path / "vim_t_midclstok_ft_78p3acc.pth")
    loaded = load_model(tmp_path / "vim_t_midclstok_ft_78p3acc.pth", img_size=448)  # 55x55 grid, class row 1512
    assert loaded.checkpoint_info["name"] == "vim_tiny_stride8"
    assert loaded.pos_embed.shape[1] == 55 * 55 + 1
    assert torch.equal(loaded.pos_embed[:, 1512], model.pos_embed[:, 364])


def test_video_spatial_pos_embed_interpolation(tmp_path):
    model = small("videomamba_video_tiny", img_size=32, num_frames=4)
    torch.save(model.state_dict(), tmp_path / "videomamba_t16_k400_f4.pth")
    loaded = load_model(tmp_path / "videomamba_t16_k400_f4.pth", img_size=48)
    assert loaded.pos_embed.shape == (1, 10, 64)
    assert torch.equal(loaded.pos_embed[:, 0], model.pos_embed[:, 0])
    assert torch.equal(loaded.temporal_pos_embedding, model.temporal_pos_embedding)
    assert logits(loaded, image_input(loaded, batch=1)).shape == (1, 400)


def test_inflate_image_weights_into_video_model(tmp_path):
    image = small("videomamba_tiny", img_size=32)
    path = save_official_checkpoint(image, tmp_path / "videomamba_t16_in1k_res224.pth")
    video_cfg = dict(SMALL, img_size=32, num_frames=4, kernel_size=2)
    with pytest.warns(CheckpointWarning) as record:
        video = load_model(path, name="videomamba_video_tiny", **video_cfg)
    warned = " ".join(str(w.message) for w in record)
    assert "temporal_pos_embedding" in warned and "dropped the checkpoint's head" in warned
    w2d, w3d = image.patch_embed.proj.weight, video.patch_embed.proj.weight
    assert w3d.shape == (64, 3, 2, 16, 16)
    assert torch.equal(w3d[:, :, 1], w2d) and not w3d[:, :, 0].any()  # centre slice (T//2), zeros elsewhere
    assert not video.temporal_pos_embedding.any()
    assert torch.equal(video.pos_embed, image.pos_embed) and torch.equal(video.cls_token, image.cls_token)
    assert torch.equal(video.layers[1].mixer.A_log, image.layers[1].mixer.A_log)
    assert video.head.weight.shape == (400, 64)
    assert logits(video, image_input(video, batch=1)).shape == (1, 400)

    # A head that fits is kept.
    with pytest.warns(CheckpointWarning, match="temporal_pos_embedding"):
        kept = load_model(path, name="videomamba_video_tiny", num_classes=1000, **video_cfg)
    assert torch.equal(kept.head.weight, image.head.weight)


def test_distill_head_is_ignored(tmp_path):
    model = small("videomamba_tiny")
    sd = dict(model.state_dict(), **{"distill_head.0.weight": torch.ones(64),
                                     "distill_head.1.weight": torch.zeros(384, 64),
                                     "distill_head.1.bias": torch.zeros(384)})
    torch.save({"model": sd, "args": argparse.Namespace(model="videomamba_middle_distill")}, tmp_path / "m.pth")
    with pytest.warns(CheckpointWarning, match="distill_head"):
        loaded = load_model(tmp_path / "m.pth")
    assert loaded.checkpoint_info["name"] == "videomamba_tiny"
    assert_same_weights(loaded, model)


# ------------------------------------------------------------------------------------------ hub
def test_hub_offline_says_what_to_download(monkeypatch):
    import huggingface_hub

    import vimtr.models.hub
    monkeypatch.setattr(vimtr.models.hub, "unreachable", lambda *a, **k: None)  # the Hub answers the probe

    def offline(**kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot reach the Hub and the file is not cached")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(CheckpointError) as err:
        load_model("hustvl/Vim-tiny-midclstok")
    msg = str(err.value)
    assert "https://huggingface.co/hustvl/Vim-tiny-midclstok/resolve/main/vim_t_midclstok_76p1acc.pth" in msg
    assert "load_model('/path/to/vim_t_midclstok_76p1acc.pth')" in msg and "LocalEntryNotFoundError" in msg


def test_hub_without_huggingface_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes `import huggingface_hub` fail
    with pytest.raises(CheckpointError) as err:
        load_model("hustvl/Vim-small-midclstok:vim_s_midclstok_ft_81p6acc.pth")
    msg = str(err.value)
    assert "huggingface_hub is not installed" in msg
    assert "https://huggingface.co/hustvl/Vim-small-midclstok/resolve/main/vim_s_midclstok_ft_81p6acc.pth" in msg


def test_hub_download_then_load(tmp_path, monkeypatch, no_checkpoint_warnings):
    import huggingface_hub

    import vimtr.models.hub
    monkeypatch.setattr(vimtr.models.hub, "unreachable", lambda *a, **k: None)  # the Hub answers the probe
    model = small("videomamba_tiny")
    local = tmp_path / "blob"  # the HF cache's file name says nothing; the requested name does
    torch.save(model.state_dict(), local)
    requested = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                        lambda repo_id, filename: requested.append((repo_id, filename)) or str(local))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CheckpointWarning)  # the file-name layout hint is a notice
        loaded = load_model("OpenGVLab/VideoMamba")
    assert requested == [("OpenGVLab/VideoMamba", "videomamba_t16_in1k_res224.pth")]
    assert loaded.checkpoint_info["file"] == "OpenGVLab/VideoMamba:videomamba_t16_in1k_res224.pth"
    assert loaded.cls_position == "first"
    assert_same_weights(loaded, model)
    with pytest.raises(CheckpointError, match="needs a file name"):
        load_model("someone/some-vim")


# ------------------------------------------------------------------------------------------ bundled models
def test_bundled_model(tmp_path, monkeypatch, no_checkpoint_warnings):
    model = small()
    save_file(model.state_dict(), tmp_path / "toy.safetensors")
    (tmp_path / "toy.json").write_text(json.dumps({"model": "vim_tiny", "config": SMALL, "accuracy": 0.9}))
    (tmp_path / "nocard.safetensors").write_bytes(b"")
    (tmp_path / "badcard.json").write_text(json.dumps({"config": {}}))
    save_file(model.state_dict(), tmp_path / "badcard.safetensors")
    monkeypatch.setattr(ckpt_mod, "assets_dir", lambda: tmp_path)
    loaded = load_model("toy")
    assert_same_weights(loaded, model)
    assert loaded.checkpoint_info["format"] == "bundled" and loaded.checkpoint_info["name"] == "vim_tiny"
    with pytest.raises(CheckpointError, match=r"badcard.*'model' key"):
        load_model("badcard")
    with pytest.raises(CheckpointError, match="no such file.*toy"):  # listed among the bundled names
        load_model("nocard")


# ------------------------------------------------------------------------------------------ vimtr checkpoints
def test_vimtr_checkpoint_rebuilds_from_its_record(tmp_path, no_checkpoint_warnings):
    model, ema = small("videomamba_tiny", seed=0), small("videomamba_tiny", seed=1)
    record = {"model_name": "videomamba_tiny", "config": dict(SMALL), "reduction": None}
    torch.save({"vimtr": record, "model": model.state_dict(), "model_ema": ema.state_dict(), "epoch": 3},
               tmp_path / "retrained.pth")
    loaded = load_model(tmp_path / "retrained.pth")
    assert loaded.checkpoint_info["format"] == "vimtr" and loaded.cls_position == "first"
    assert_same_weights(loaded, model)
    assert_same_weights(load_model(tmp_path / "retrained.pth", use_ema=True), ema)
    # A full dumped config (model.config, registry defaults included) rebuilds the same model.
    torch.save({"vimtr": dict(record, config=model.config), "model": model.state_dict()}, tmp_path / "full.pth")
    assert_same_weights(load_model(tmp_path / "full.pth"), model)
    with pytest.raises(CheckpointError, match="written by vimtr for videomamba_tiny"):
        load_model(tmp_path / "retrained.pth", name="vim_tiny")
    torch.save({"vimtr": {"config": {}}, "model": model.state_dict()}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="malformed 'vimtr' record"):
        load_model(tmp_path / "bad.pth")


def test_vimtr_checkpoint_reapplies_recorded_reduction(tmp_path, monkeypatch):
    import vimtr.reduction
    calls = []
    monkeypatch.setattr(vimtr.reduction, "reduce",
                        lambda model, method, **params: calls.append((method, params)) or model)
    model = small()
    record = {"model_name": "vim_tiny", "config": SMALL, "reduction": {"method": "mtr", "params": {"r": 2}}}
    torch.save({"vimtr": record, "model": model.state_dict()}, tmp_path / "reduced.pth")
    loaded = load_model(tmp_path / "reduced.pth")
    assert calls == [("mtr", {"r": 2})]
    assert loaded.checkpoint_info["reduction"] == {"method": "mtr", "params": {"r": 2}}


def test_vimtr_checkpoint_with_the_real_reduce_module(tmp_path):
    method = "mtr"
    model = small()
    record = {"model_name": "vim_tiny", "config": SMALL, "reduction": {"method": method, "params": {"r": 1}}}
    torch.save({"vimtr": record, "model": model.state_dict()}, tmp_path / "reduced.pth")
    loaded = load_model(tmp_path / "reduced.pth")
    assert loaded.reducer is not None
    assert logits(loaded, image_input(loaded, batch=1)).shape == (1, 1000)
