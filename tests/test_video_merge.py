"""R-MeeTo on video models: ``vimtr.reduce(video_model, "rmeeto", ...)`` against a literal re-statement of
R-MeeTo's ``video_task`` merge (``R_MeeTo_merge.RMeeTo_Merge`` ordered merge + ``merge_wavg`` inside
``R_MeeTo_Mamba``'s blocks), written here from the official code's semantics step by step, and the video
schedule rules (constant r, default 88, no ``compare``)."""
import pytest
import torch

import vimtr

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def small_video(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(depth=6, embed_dim=32, d_state=8, num_frames=4, img_size=32, patch_size=8, num_classes=7)
    cfg.update(kw)
    model = vimtr.create_model("videomamba_video_tiny", **cfg).eval()
    with torch.no_grad():  # move the symmetric official init off its fixed points (as the golden P1b case)
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "norm_f.weight")):
                p.uniform_(0.5, 1.5)
            elif name.endswith(("D", "D_b")):
                p.add_(torch.randn_like(p) * 0.5)
    return model


def official_merge(hidden, residual, size, num_prune):
    """One merge event of R-MeeTo's video model, as its code does it (class token at position 0).

    r = min(num_prune, (L − 1) // 2); the metric is the block input ``hidden`` without the class token,
    rows L2-normalised; A = even, B = odd class-free positions; each A token's best B (cosine); the r best
    A tokens are scatter-added (sum, destination included) into their B tokens, each stream multiplied
    by the pre-merge sizes and divided by the merged sizes afterwards; the kept tokens (unmerged A + all
    B) are put back in their original order; the class token goes back to int(0 · (t − r) // t) = 0.
    """
    B, L, C = hidden.shape
    r = min(num_prune, (L - 1) // 2)
    if r <= 0:
        return hidden, residual, size
    metric = hidden[:, 1:]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[:, ::2], metric[:, 1::2]
    node_max, node_idx = (a @ b.transpose(-1, -2)).max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)
    unm_idx, src_idx = edge_idx[:, r:], edge_idx[:, :r]
    dst_idx = node_idx.gather(1, src_idx)

    def ordered(x):  # the official ordered_merge on x (B, L, c), mode "sum"
        c = x.shape[-1]
        cls, rest = x[:, :1], x[:, 1:]
        src, dst = rest[:, ::2], rest[:, 1::2]
        origin = torch.arange(L - 1).expand(B, L - 1)
        unm = src.gather(1, unm_idx[..., None].expand(-1, -1, c))
        moved = src.gather(1, src_idx[..., None].expand(-1, -1, c))
        dst = dst.scatter_reduce(1, dst_idx[..., None].expand(-1, -1, c), moved, reduce="sum")
        order = torch.cat((origin[:, ::2].gather(1, unm_idx), origin[:, 1::2]), dim=1).argsort(dim=1)
        seq = torch.cat((unm, dst), dim=1).gather(1, order[..., None].expand(-1, -1, c))
        return torch.cat((cls, seq), dim=1)

    new_size = ordered(size)
    return ordered(hidden * size) / new_size, ordered(residual * size) / new_size, new_size


def official_forward(model, x, num_prune, interval=2):
    """R_MeeTo_Mamba.forward_features + head, with our (P3-verified) embedding and blocks."""
    hidden, residual = model.embed(x), None
    size = torch.ones(*hidden.shape[:2], 1)
    lengths = []
    for i, layer in enumerate(model.layers):
        if i > 0 and i % interval == 0:  # create_block's if_merge (merge_interval 2, not odd)
            hidden, residual, size = official_merge(hidden, residual, size, num_prune)
        lengths.append(hidden.shape[1])
        hidden, residual, _ = layer(hidden, residual)
    final = model.norm_f(residual + hidden.float())
    return model.head(final[:, 0]), lengths, size.squeeze(-1)


@pytest.mark.parametrize("r", [5, 30])  # 30: above (L-1)//2 = 17 at the second event, capped as officially
def test_video_rmeeto_equals_the_official_video_merge(r):
    model = small_video()
    x = torch.randn(3, *model.input_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref_logits, ref_lengths, ref_sizes = official_forward(model, x, r)
        vimtr.reduce(model, "rmeeto", r=r)
        logits = model(x)
    trace = model.reduction_trace
    assert trace["tokens"] == ref_lengths
    assert trace["cls_index"] == [0] * len(model.layers)
    assert torch.equal(trace["sizes"], ref_sizes)
    assert (ref_sizes.sum(-1) == model.num_tokens).all()
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    # The reference moves tokens: without any merge the two forwards agree with the unreduced model.
    assert ref_lengths[-1] < model.num_tokens


def test_reference_detects_a_wrong_order():
    """The comparison above can fail: unordered merging (A tokens first) changes the logits."""
    model = small_video()
    x = torch.randn(2, *model.input_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref_logits, _, _ = official_forward(model, x, 5)
        vimtr.reduce(model, "rmeeto", r=5, ordered=False)
        assert not torch.allclose(model(x), ref_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,depth,final", [("videomamba_video_tiny", 24, 601), ("videomamba_video_small", 24, 601),
                                              ("videomamba_video_middle", 32, 249)])
def test_video_default_is_rmeeto_k400_schedule(name, depth, final):
    """R-MeeTo's K400 checkpoints: r=88 at blocks 2, 4, ..., leaving 601 (Ti/S, 11 events) or 249 (M, 15)."""
    model = vimtr.reduce(vimtr.create_model(name), "rmeeto")
    red = model.reducer
    assert red.r == [88 if i > 0 and i % 2 == 0 else 0 for i in range(depth)]
    assert red.lengths[0] == 1569 and red.lengths[-1] == final
    assert model.reduction["params"]["r"] == red.r


def test_video_refuses_the_image_compare_override():
    with pytest.raises(ValueError, match="compare.*video"):
        vimtr.reduce(small_video(), "rmeeto", r=5, compare=11)
    # Image models keep it (the golden P2 case uses it).
    vimtr.reduce(vimtr.create_model("vim_tiny"), "rmeeto", r=11, compare=11)
