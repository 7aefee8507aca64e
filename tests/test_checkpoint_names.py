"""What a checkpoint's file name says (the class-token layout), and Hugging Face ids that cannot be fetched."""
import warnings

import pytest
import torch

import vimtr
import vimtr.models.hub as hub
from vimtr.models.checkpoint import CheckpointError, CheckpointWarning

SMALL = dict(depth=2, embed_dim=64, img_size=64)


def _flat_checkpoint(tmp_path, name, file_name):
    """A state dict saved without ``args`` (as the flat and DDP files people pass around are)."""
    torch.manual_seed(0)
    model = vimtr.create_model(name, **SMALL).eval()
    path = tmp_path / file_name
    torch.save({"model": model.state_dict()}, path)
    return model, path


@pytest.mark.parametrize("name, file_name, position", [
    ("vim_tiny", "vim_t_midclstok_76p1acc.pth", "middle"),
    ("vim_small", "vim_s_midclstok_ft_81p6acc.pth", "middle"),
    ("videomamba_tiny", "videomamba_t16_in1k_res224.pth", "first"),
])
def test_file_name_decides_the_layout_without_a_warning(tmp_path, name, file_name, position):
    model, path = _flat_checkpoint(tmp_path, name, file_name)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)  # the README promises the file name is used
        loaded = vimtr.load_model(path)
    assert loaded.cls_position == position
    assert any("file name" in n for n in loaded.checkpoint_info["notices"])  # recorded all the same
    x = torch.randn(1, *model.input_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_a_silent_file_name_still_warns(tmp_path):
    _, path = _flat_checkpoint(tmp_path, "vim_tiny", "weights.pth")
    with pytest.warns(CheckpointWarning, match="does not say whether it is Vim or VideoMamba"):
        loaded = vimtr.load_model(path)
    assert loaded.cls_position == "middle"


# ------------------------------------------------------------------------------------------ hub
@pytest.fixture
def hub_calls(monkeypatch, tmp_path):
    """Record hf_hub_download calls (none may reach the network) with an empty Hugging Face cache."""
    import huggingface_hub

    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda **kw: calls.append(kw) or str(tmp_path / "x"))
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda **kw: None)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return calls


def test_unreachable_hub_fails_before_downloading(monkeypatch, hub_calls):
    # RFC 2606: names under .invalid never resolve, on any network.
    monkeypatch.setattr(hub, "_endpoint", lambda: "https://hub.invalid")
    with pytest.raises(CheckpointError) as err:
        vimtr.load_model("hustvl/Vim-tiny-midclstok")
    msg = str(err.value)
    assert hub_calls == []  # no retrying download: the probe already knew
    assert "hub.invalid:443" in msg and "offline?" in msg
    assert "https://huggingface.co/hustvl/Vim-tiny-midclstok/resolve/main/vim_t_midclstok_76p1acc.pth" in msg
    assert "--checkpoint /path/to/vim_t_midclstok_76p1acc.pth" in msg


def test_hf_hub_offline_is_honoured(monkeypatch, hub_calls):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="HF_HUB_OFFLINE is set"):
        vimtr.load_model("hustvl/Vim-small-midclstok")
    assert hub_calls == []


def test_a_cached_file_needs_no_network(tmp_path, monkeypatch, hub_calls):
    import huggingface_hub

    model, path = _flat_checkpoint(tmp_path, "videomamba_tiny", "blob")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline, yet the cached copy is there
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo_id, filename: str(path) if repo_id == "OpenGVLab/VideoMamba" else None)
    loaded = vimtr.load_model("OpenGVLab/VideoMamba")  # file name videomamba_t16_in1k_res224.pth: class first
    assert hub_calls == [] and loaded.cls_position == "first"


def test_is_hub_id():
    assert hub.is_hub_id("hustvl/Vim-tiny-midclstok") and hub.is_hub_id("a/b:c.pth")
    assert not hub.is_hub_id("runs/vim_s/best.pt") and not hub.is_hub_id("vim_digits")
