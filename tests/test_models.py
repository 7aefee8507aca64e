"""Backbones: every registered model builds and runs, official parameter counts, batch independence."""
import pytest
import torch

import vimtr
from vimtr.models import ALIASES

SMALL = dict(depth=2, embed_dim=32, img_size=32, patch_size=8)


@pytest.mark.parametrize("name,count", [("vim_tiny", 7_148_008), ("vim_small", 25_796_584),
                                        ("vim_base", 97_598_440), ("vim_tiny_stride8", 7_250_344)])
def test_official_parameter_counts(name, count):
    assert sum(p.numel() for p in vimtr.create_model(name).parameters()) == count


def test_official_state_dict_layout():
    sd = vimtr.create_model("vim_tiny").state_dict()
    assert len(sd) == 415
    assert sd["pos_embed"].shape == (1, 197, 192)
    assert sd["layers.0.mixer.x_proj_b.weight"].shape == (44, 384)
    assert vimtr.create_model("vim_tiny_stride8").state_dict()["pos_embed"].shape == (1, 730, 192)
    v = vimtr.create_model("videomamba_video_tiny").state_dict()
    assert v["patch_embed.proj.weight"].shape == (192, 3, 1, 16, 16)
    assert v["temporal_pos_embedding"].shape == (1, 8, 192)


@pytest.mark.parametrize("name", vimtr.list_models())
def test_every_registered_model_runs(name):
    """Full-size configuration, small forward: real shapes, class-token layout and cls index."""
    video = "_video_" in name
    kw = dict(depth=2) if not video else dict(depth=2, num_frames=2)
    model = vimtr.create_model(name, **kw).eval()
    x = torch.randn(1, *model.input_size)
    with torch.no_grad():
        state = model.forward_tokens(x)
        logits = model(x)
    expected_cls = 0 if name.startswith("videomamba") else model.num_patches // 2
    assert state.cls_index == expected_cls
    if name.endswith("stride8"):
        assert state.hidden.shape[1] == 730 and state.cls_index == 364
    if video:
        assert state.hidden.shape[1] == 1 + 2 * 196
    assert logits.shape == (1, model.num_classes) and torch.isfinite(logits).all()
    assert model.num_classes == (400 if video else 10 if name in ("vim_digits", "vim_digits_clutter") else 1000)


def test_aliases_resolve_to_registered_models():
    for alias, name in ALIASES.items():
        assert vimtr.create_model(alias, **SMALL).model_name == name


def test_overrides_and_bad_names():
    m = vimtr.create_model("vim_small", depth=3, embed_dim=48, img_size=64, patch_size=16, stride=8,
                           num_classes=7, in_chans=1, d_state=8)
    assert m.num_patches == 49 and m.initial_cls_index == 24 and len(m.layers) == 3
    assert m(torch.randn(2, 1, 64, 64)).shape == (2, 7)
    with pytest.raises(ValueError, match="Did you mean vim_tiny"):
        vimtr.create_model("vim_tiy")
    with pytest.raises(TypeError, match="unknown override"):
        vimtr.create_model("vim_tiny", widht=3)


def test_wrong_input_size_names_expected_size():
    m = vimtr.create_model("vim_tiny", **SMALL)
    with pytest.raises(ValueError, match=r"expects input of shape \(batch, 3, 32, 32\)"):
        m(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="expects input of shape"):
        m(torch.randn(1, 1, 32, 32))


@pytest.mark.parametrize("name", ["vim_tiny", "videomamba_tiny", "videomamba_video_tiny"])
def test_outputs_do_not_depend_on_batch_size(name):
    kw = dict(SMALL, num_frames=2) if "_video_" in name else SMALL
    torch.manual_seed(0)
    m = vimtr.create_model(name, **kw).eval()
    x = torch.randn(3, *m.input_size)
    with torch.no_grad():
        full = m(x)
        alone = torch.cat([m(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(full, alone, rtol=1e-5, atol=1e-5)


def test_video_tokens_are_frame_major():
    """Token 1 + t·HW + p is patch p of frame t: changing frame 1 changes only its tokens' embedding."""
    m = vimtr.create_model("videomamba_video_tiny", **SMALL, num_frames=3).eval()
    x = torch.randn(1, *m.input_size)
    y = x.clone()
    y[:, :, 1] += 1.0
    with torch.no_grad():
        diff = (m.embed(x) - m.embed(y)).abs().sum(-1)[0]
    hw = m.num_patches
    assert diff[0] == 0 and (diff[1:1 + hw] == 0).all() and (diff[1 + hw:1 + 2 * hw] > 0).all()
    assert (diff[1 + 2 * hw:] == 0).all()


def test_directions_are_averaged_for_vim_and_summed_for_videomamba():
    torch.manual_seed(0)
    vim = vimtr.create_model("vim_tiny", **SMALL).eval()
    vm = vimtr.create_model("videomamba_tiny", **SMALL).eval()
    vm.load_state_dict(vim.state_dict())
    h = torch.randn(2, 17, 32)
    with torch.no_grad():
        a, _ = vim.layers[0].mixer(h)
        b, _ = vm.layers[0].mixer(h)
    torch.testing.assert_close(2 * a, b, rtol=1e-5, atol=1e-6)


def test_gradients_flow_in_train_mode():
    m = vimtr.create_model("vim_tiny", **SMALL, drop_path_rate=0.1).train()
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())


def test_set_drop_path_spreads_the_rate_linearly_and_zero_takes_identities():
    from vimtr.models.layers import DropPath
    m = vimtr.create_model("vim_tiny", **{**SMALL, "depth": 3}, drop_path_rate=0.1)
    x = torch.randn(2, 3, 32, 32)
    before = m.eval()(x)
    m.set_drop_path(0.2)
    rates = [b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0 for b in m.layers]
    assert rates == pytest.approx([0.0, 0.1, 0.2]) and m.drop_path.drop_prob == pytest.approx(0.2)
    m.set_drop_path(0.0)
    assert all(isinstance(b.drop_path, torch.nn.Identity) for b in m.layers)
    assert isinstance(m.drop_path, torch.nn.Identity)
    assert torch.equal(m(x), before)  # inference does not see it
    assert m.config["drop_path_rate"] == 0.1  # the built model's record stays
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        m.set_drop_path(1.0)


def test_local_init_and_drop_path_match_timm_bit_for_bit():
    """models/ does not import timm; its trunc_normal_, lecun_normal_ and DropPath give timm's values for the
    same random state, so a seeded create_model initialises as before."""
    from timm.layers import DropPath as TimmDropPath, lecun_normal_ as timm_lecun, trunc_normal_ as timm_trunc

    from vimtr.models.layers import DropPath
    from vimtr.models.vim import lecun_normal_, trunc_normal_
    for ours, theirs, shape in ((lambda t: trunc_normal_(t, std=0.02), lambda t: timm_trunc(t, std=0.02), (64, 48)),
                                (lecun_normal_, timm_lecun, (32, 3, 4, 4))):
        a, b = torch.empty(shape), torch.empty(shape)
        torch.manual_seed(1)
        ours(a)
        torch.manual_seed(1)
        theirs(b)
        assert torch.equal(a, b)
    x = torch.randn(6, 5, 4)
    for rate in (0.0, 0.3):
        ours, theirs = DropPath(rate).train(), TimmDropPath(rate).train()
        torch.manual_seed(2)
        a = ours(x)
        torch.manual_seed(2)
        assert torch.equal(a, theirs(x))
    assert torch.equal(DropPath(0.5).eval()(x), x)
