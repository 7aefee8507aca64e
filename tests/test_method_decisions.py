"""Each reduction method's defining decision, held against a computation written here from its description.

The other reduction tests check properties every method shares (lengths, class token, gradients, restore);
none of them notices a method that picks the wrong tokens. Here a tiny model (random weights, fixed seed,
eval mode) reduces at one block only, with ``trace_source=True``: after that step the source map
(B, L', P) says exactly which input patches each surviving token stands for, i.e. which tokens were
kept, merged into which, or dropped. The expected map is computed in this file from scratch, from the
method's documented rule and what a forward hook sees of the model (a block's input and output), never
from the method's own code. A further step (schedule ``r=[0, 0, k, k]``) checks the merged values.

Only public entry points are used: ``vimtr.create_model``, ``vimtr.reduce``, ``model.reduction_trace``,
``vimtr.ops.scan_backend`` and forward hooks on ``model.layers[i]``.

Every registered method must appear in :data:`HELD_HERE` or :data:`HELD_ELSEWHERE`
(``test_every_method_has_a_decision_test``): a new method comes with a test that fails when its defining
choice is inverted (CONTRIBUTING.md).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import vimtr
from vimtr.ops import scan_backend

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

# depth 4, 8×8 patches of a 64×64 image: L = 65 tokens, the class token at 32; small enough for ~0.1 s a forward.
MODEL = dict(depth=4, embed_dim=48, img_size=64, patch_size=8)
STEP = 2  # the one reducing block: it reads block STEP − 1's mixer
BATCH = 2
# The gap required at every boundary the expected plan depends on (between the last token of a group and
# the first of the next, between a token's best and second-best match), relative to the scores' spread.
# Kernels and this file round differently (fp32 fused kernels vs float64 here); a smaller gap could flip a
# tie and would make the test depend on rounding, not on the rule.
MARGIN = 1e-4


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return vimtr.create_model("vim_tiny", **{**MODEL, **kw}).eval()


def images(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, *model.input_size, generator=g)


def schedule(model, *steps):
    """r per block: ``steps`` is {block: r}."""
    r = [0] * len(model.layers)
    for block, k in steps:
        r[block] = k
    return r


def run(model, x, method, r, **params):
    """Reduce ``model`` with ``method`` and schedule ``r``, run it on ``x``; returns (trace, captured), where
    captured[i] = (block i's output hidden, its residual stream), float64: the mixer's output and the stream
    the block added up (and normalised) before its mixer; a reduction step before block i + 1 reads both."""
    vimtr.reduce(model, method, r=r, trace_source=True, **params)
    captured, handles = {}, []
    for i, layer in enumerate(model.layers):
        def hook(module, args, output, i=i):
            captured[i] = (output[0].double(), output[1].double())
        handles.append(layer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return model.reduction_trace, captured


# ------------------------------------------------------------------------- independent recomputations
def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def mixer_deltas(block, residual_out):
    """Δ of both scan directions of ``block``'s mixer, (B, L, E) each, in token order, in float64: RMSNorm of
    the residual stream the block added up, in_proj, causal depthwise conv + SiLU, x_proj, dt_proj,
    softplus(· + bias). The backward direction runs on the flipped sequence and is flipped back."""
    m = block.mixer
    normed = rms_norm(residual_out, block.norm.weight, block.norm.eps)
    xz = normed @ m.in_proj.weight.double().t()
    if m.in_proj.bias is not None:
        xz = xz + m.in_proj.bias.double()
    E, R, L = m.d_inner, m.dt_rank, normed.shape[1]
    x = xz[..., :E].transpose(1, 2)  # (B, E, L)

    def direction(seq, conv, x_proj, dt_proj):
        c = F.conv1d(seq, conv.weight.double(), conv.bias.double(), padding=conv.weight.shape[-1] - 1,
                     groups=E)[..., :L]
        c = F.silu(c).transpose(1, 2)  # (B, L, E)
        dt = (c @ x_proj.weight.double().t())[..., :R]
        return F.softplus(dt @ dt_proj.weight.double().t() + dt_proj.bias.double())

    delta_f = direction(x, m.conv1d, m.x_proj, m.dt_proj)
    delta_b = direction(x.flip(-1), m.conv1d_b, m.x_proj_b, m.dt_proj_b).flip(1)
    return delta_f, delta_b


def without_cls(x, c):
    return torch.cat((x[:, :c], x[:, c + 1:]), dim=1)


def cosine(a, b):
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).transpose(-1, -2)


def require_gap(values, boundary, what):
    """The ``boundary``-th and next largest of ``values`` (1-D) differ by MARGIN of their spread."""
    v = values.sort(descending=True).values
    spread = (v[0] - v[-1]).item() or 1.0
    gap = (v[boundary - 1] - v[boundary]).item()
    assert gap > MARGIN * spread, (f"{what}: a near-tie ({gap:.3g}) at the boundary the test depends on; "
                                   f"choose another seed")


def best_match(sim, what):
    """argmax per row of ``sim`` (n, m), requiring a clear winner."""
    if sim.shape[1] > 1:
        top = sim.topk(2, dim=-1).values
        spread = (sim.max() - sim.min()).item() or 1.0
        assert ((top[:, 0] - top[:, 1]) > MARGIN * spread).all(), f"{what}: a near-tie between two matches"
    return sim.argmax(dim=-1)


def expected_source(groups, P, cls_pos):
    """The source map (L', P) of the survivors ``groups`` (a list, in output order, of lists of class-free
    positions, which before the first reduction are the patch indices), the class token's empty row at
    ``cls_pos``."""
    rows = torch.zeros(len(groups) + 1, P)
    out = [r for r in range(len(groups) + 1) if r != cls_pos]
    for row, members in zip(out, groups):
        rows[row, members] = 1.0
    return rows


def check_groups(trace, groups_per_sample, cls_pos, P, block=STEP):
    """The final source map is the expected one, sample by sample, and the class token sits at ``cls_pos``
    from ``block`` on."""
    source = trace["source"]
    assert trace["cls_index"][block] == cls_pos, (trace["cls_index"], cls_pos)
    for b, groups in enumerate(groups_per_sample):
        want = expected_source(groups, P, cls_pos)
        got = source[b]
        assert got.shape == want.shape, (got.shape, want.shape)
        if not torch.equal(got, want):
            wrong = [i for i in range(len(want)) if not torch.equal(got[i], want[i])]
            show = lambda m, i: m[i].nonzero().flatten().tolist()
            raise AssertionError(f"sample {b}: {len(wrong)} tokens stand for other patches than the rule says; "
                                 f"first at output row {wrong[0]}: got {show(got, wrong[0])}, expected "
                                 f"{show(want, wrong[0])}")


def proportional(c, L, r):
    """R-MeeTo's class-token rule, floor(c·(L−r)/L), written out."""
    return math.floor(c * (L - r) / L)


def merged_groups(survivors, merges):
    """survivors: class-free positions in output order; merges: {source position: target position}."""
    members = {t: [t] for t in survivors}
    for s, t in merges.items():
        members[t].append(s)
    return [sorted(members[t]) for t in survivors]


# ------------------------------------------------------------------------------------------------- MTR
def mtr_groups(model, captured, r, keep_ratio=0.5):
    """MTR's rule (src/vimtr/reduction/mtr.py, README): importance = channel mean of Δ_f + Δ_b of the
    previous block; keep the top keep_ratio of the class-free tokens, the r least important are sources,
    the rest targets; each source merges into its most cosine-similar target on the mixer output."""
    prev = STEP - 1
    out, res = captured[prev]
    delta_f, delta_b = mixer_deltas(model.layers[prev], res)
    c = model.initial_cls_index
    score = without_cls((delta_f + delta_b).mean(-1, keepdim=True), c).squeeze(-1)  # (B, T)
    feats = without_cls(out, c)
    T = score.shape[1]
    n_keep = min(int(keep_ratio * T), T - r - 1)
    groups = []
    for b in range(score.shape[0]):
        require_gap(score[b], n_keep, "mtr keep/target")
        require_gap(score[b], T - r, "mtr target/source")
        order = score[b].argsort(descending=True)
        keep, tgt, src = order[:n_keep], order[n_keep:T - r], order[T - r:]
        best = tgt[best_match(cosine(feats[b, src], feats[b, tgt]), "mtr source→target")]
        survivors = sorted(torch.cat((keep, tgt)).tolist())
        groups.append(merged_groups(survivors, dict(zip(src.tolist(), best.tolist()))))
    return groups


@pytest.mark.parametrize("path", ["cpu", "reference"])
def test_mtr_merges_the_least_important_tokens_by_delta_of_both_directions(path):
    """The fused CPU path (Δ summed inside the scan kernels) and the general path (Δ from the mixer's flips):
    the same groups as Δ recomputed here from the weights, both directions, the backward one flipped back."""
    model, r = tiny(), 12
    x = images(model)
    with scan_backend(path):
        trace, captured = run(model, x, "mtr", schedule(model, (STEP, r)))
    L, P = model.num_patches + 1, model.num_patches
    check_groups(trace, mtr_groups(model, captured, r), proportional(model.initial_cls_index, L, r), P)


def test_mtr_scores_are_not_the_forward_direction_alone():
    """A guard on the test above: on this model the forward scan's Δ alone ranks the tokens differently, so
    a reducer reading one direction (or the backward one unflipped) cannot pass it."""
    model, r = tiny(), 12
    _, captured = run(model, images(model), "mtr", schedule(model, (STEP, r)))
    delta_f, delta_b = mixer_deltas(model.layers[STEP - 1], captured[STEP - 1][1])
    c, T = model.initial_cls_index, model.num_patches
    rank = lambda s: set(without_cls(s.mean(-1, keepdim=True), c).squeeze(-1)[0].argsort()[:r].tolist())
    both = rank(delta_f + delta_b)
    assert rank(delta_f) != both and rank(delta_f + delta_b.flip(1)) != both and rank(-(delta_f + delta_b)) != both
    assert len(both) == r and T > 2 * r


# ------------------------------------------------------------------------------------ merged values
def check_merged_values(model, x, method, k, sized, **params):
    """A second step (schedule r=[0, 0, k, k]) merges tokens that already stand for several patches: the
    residual stream block STEP + 1 adds up must be, per group, the mean of what block STEP left, weighted by
    the tokens' sizes (``sized``) or plain. The groups are read from the source maps (which patches each
    token stands for after one step and after two); the weights and the mean are computed here."""
    one, _ = run(model, x, method, schedule(model, (STEP, k)), **params)
    two, captured = run(model, x, method, schedule(model, (STEP, k), (STEP + 1, k)), **params)
    s1, s2 = one["source"], two["source"]
    c1, c2 = one["cls_index"][STEP], two["cls_index"][STEP + 1]
    out, res = captured[STEP]
    stream = res + out  # what the next block adds up before its norm, one row per token after step one
    got = captured[STEP + 1][1]
    unequal = 0
    for b in range(x.shape[0]):
        size = s1[b].sum(-1).double()
        size[c1] = 1.0  # the class token stands for no patch, and counts once
        overlap = s2[b].double() @ s1[b].double().t()  # (L2, L1): patches shared by final and step-one tokens
        member = (overlap == size.unsqueeze(0)) & (size.unsqueeze(0) > 0)  # step-one token wholly inside
        member[:, c1] = False
        member[c2, c1] = True
        assert member.sum(0).eq(1).all(), "each step-one token belongs to exactly one token after step two"
        w = member.double() * (size if sized else torch.ones_like(size)).unsqueeze(0)
        want = (w @ stream[b]) / w.sum(1, keepdim=True)
        torch.testing.assert_close(got[b], want, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{method}: merged values are not the "
                                                 f"{'size-weighted' if sized else 'plain'} mean\n{m}")
        unequal += sum(len(set(size[member[j]].tolist())) > 1 for j in range(member.shape[0]))
    assert unequal > 0, "no group merged tokens of different sizes: weighted and plain means would agree"


def test_rmeeto_merges_with_size_weighted_means():
    model = tiny()
    check_merged_values(model, images(model), "rmeeto", 10, sized=True)


def test_mtr_merges_with_plain_means_by_default():
    """MTR's paper: "the average of the two vectors" (mtr.py: ``weighted=False``); ``weighted=True`` sizes."""
    model = tiny()
    check_merged_values(model, images(model), "mtr", 8, sized=False)
    check_merged_values(model, images(model), "mtr", 8, sized=True, weighted=True)


# --------------------------------------------------------------------------------------------- R-MeeTo
def rmeeto_groups(model, captured, r, ordered, prune):
    """R-MeeTo's bipartite matching (rmeeto.py, R-MeeTo's merge.py): on the class-free mixer output, set A =
    even positions, set B = odd ones; each A token's most cosine-similar B token; the r A tokens with the best
    matches merge into them (or are dropped, ``prune``). ``ordered``: survivors in their original order;
    otherwise the unmerged A tokens first, best match first, then B."""
    out = captured[STEP - 1][0]
    feats = without_cls(out, model.initial_cls_index)
    T = feats.shape[1]
    a_pos, b_pos = torch.arange(0, T, 2), torch.arange(1, T, 2)
    groups = []
    for b in range(feats.shape[0]):
        sim = cosine(feats[b, a_pos], feats[b, b_pos])
        match = best_match(sim, "rmeeto A→B")
        score = sim.max(dim=-1).values
        require_gap(score, r, "rmeeto merged/unmerged")
        order = score.argsort(descending=True)
        if not ordered:  # the unmerged A tokens' order is the score order: every gap matters
            for i in range(r + 1, len(order)):
                require_gap(score, i, "rmeeto unordered A")
        src, dst = a_pos[order[:r]], b_pos[match[order[:r]]]
        unmerged = a_pos[order[r:]].tolist()
        survivors = sorted(unmerged + b_pos.tolist()) if ordered else unmerged + b_pos.tolist()
        groups.append(merged_groups(survivors, {} if prune else dict(zip(src.tolist(), dst.tolist()))))
    return groups


@pytest.mark.parametrize("ordered,prune", [(True, False), (True, True), (False, False)],
                         ids=["ordered", "ordered-prune", "unordered"])
def test_rmeeto_bipartite_groups_and_class_position(ordered, prune):
    """The default (compiled CPU plan) and the torch plan (``prune=True``, ``ordered=False``): the same groups
    as the matching written here, and the class token where R-MeeTo puts it: floor(c·(L−r)/L) in order, among
    the unmerged A tokens (floor(c·(|A|−r)/|A|)) without."""
    model, r = tiny(), 10
    trace, captured = run(model, images(model), "rmeeto", schedule(model, (STEP, r)), ordered=ordered, prune=prune)
    c, P = model.initial_cls_index, model.num_patches
    n_a = (P + 1) // 2
    cls_pos = proportional(c, P + 1, r) if ordered else proportional(c, n_a, r)
    check_groups(trace, rmeeto_groups(model, captured, r, ordered, prune), cls_pos, P)


# ----------------------------------------------------------------------------------------------- EViT
def test_evit_keeps_the_tokens_most_like_the_class_token_and_fuses_the_rest():
    """EViT's rule as ported (evit.py): score = cosine of each token to the class token on the mixer output
    (Mamba's stand-in for class attention); the top T−r−1 are kept in order, the other r+1 fused into one
    token appended after them, their softmax(score)-weighted mean."""
    model, r = tiny(), 10
    trace, captured = run(model, images(model), "evit", schedule(model, (STEP, r)))
    c, P = model.initial_cls_index, model.num_patches
    out, res = captured[STEP - 1]
    score = cosine(without_cls(out, c), out[:, c:c + 1]).squeeze(-1)  # (B, T)
    n_fused = r + 1
    groups, fused = [], []
    for b in range(score.shape[0]):
        require_gap(score[b], P - n_fused, "evit kept/fused")
        order = score[b].argsort(descending=True)
        top, low = sorted(order[:P - n_fused].tolist()), order[P - n_fused:]
        groups.append([[t] for t in top] + [sorted(low.tolist())])
        fused.append(low)
    cls_pos = proportional(c, P + 1, r)
    check_groups(trace, groups, cls_pos, P)
    # The fused token's value: the residual stream block STEP adds up, at the fused token's row (the last
    # patch token: the class token is never last here).
    stream = without_cls(res + out, c)
    got = captured[STEP][1]
    for b, low in enumerate(fused):
        w = torch.softmax(score[b, low], dim=0)
        want = (w.unsqueeze(-1) * stream[b, low]).sum(0)
        torch.testing.assert_close(got[b, -1], want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------ UTR
def test_utr_score_classification_matching_and_hybrid_reduction():
    """UTR's rule (utr.py, ToR_SSM): importance = ReLU-clipped mixer output summed over channels; the
    floor(T/2) most important are targets, the rest candidates; each candidate's most cosine-similar target
    on the clipped features; the r candidates with the best matches go, the floor(r/2) most important of them
    merged into their targets, the others pruned (``prune_ratio=0.5``)."""
    model, r = tiny(), 10
    trace, captured = run(model, images(model), "utr", schedule(model, (STEP, r)))
    c, P = model.initial_cls_index, model.num_patches
    clipped = without_cls(captured[STEP - 1][0], c).clamp(min=0)
    score = clipped.sum(-1)
    groups = []
    for b in range(score.shape[0]):
        T = score.shape[1]
        require_gap(score[b], T // 2, "utr target/candidate")
        order = score[b].argsort(descending=True)
        tgt, cand = order[:T // 2], order[T // 2:]
        sim = cosine(clipped[b, cand], clipped[b, tgt])
        match = best_match(sim, "utr candidate→target")
        node = sim.max(dim=-1).values
        require_gap(node, r, "utr removed/kept candidates")
        gone = node.argsort(descending=True)[:r]
        removed, dst = cand[gone], tgt[match[gone]]
        n_merge = r // 2
        require_gap(score[b, removed], n_merge, "utr merged/pruned")
        merged = score[b, removed].argsort(descending=True)[:n_merge]
        survivors = sorted(set(order.tolist()) - set(removed.tolist()))
        groups.append(merged_groups(survivors, dict(zip(removed[merged].tolist(), dst[merged].tolist()))))
    check_groups(trace, groups, proportional(c, P + 1, r), P)
    pruned = r - r // 2
    assert trace["sizes"].sum(1).eq(P + 1 - pruned).all()  # the pruned patches are gone from the sizes too


# --------------------------------------------------------------------------------------------- random
@pytest.mark.parametrize("seed", [0, 7])
def test_random_drops_the_seeded_subsets(seed):
    """random_prune.py: a CPU generator seeded with ``seed`` at every forward; each step drops the first r of
    ``torch.randperm(T)`` (T patch tokens then), one subset for the whole batch; survivors keep their order."""
    model, k = tiny(), 9
    trace, _ = run(model, images(model), "random", schedule(model, (STEP, k), (STEP + 1, k)), seed=seed)
    g = torch.Generator().manual_seed(seed)
    P, c = model.num_patches, model.initial_cls_index
    patches = torch.arange(P)
    for T in (P, P - k):
        patches = patches[torch.randperm(T, generator=g)[k:].sort().values]
    cls_pos = proportional(proportional(c, P + 1, k), P + 1 - k, k)
    check_groups(trace, [[[p] for p in patches.tolist()]] * BATCH, cls_pos, P, block=STEP + 1)


# ------------------------------------------------------------------------------------------- coverage
# Where each registered method's defining decision is held (CONTRIBUTING.md lists them too).
HELD_HERE = {
    "mtr": "test_mtr_merges_the_least_important_tokens_by_delta_of_both_directions",
    "rmeeto": "test_rmeeto_bipartite_groups_and_class_position",
    "evit": "test_evit_keeps_the_tokens_most_like_the_class_token_and_fuses_the_rest",
    "utr": "test_utr_score_classification_matching_and_hybrid_reduction",
    "random": "test_random_drops_the_seeded_subsets",
}
# ToMe is held against facebookresearch/ToMe's own algorithm, PuMer and HSA against re-implementations of their
# released steps, in tests/test_baselines.py.
HELD_ELSEWHERE = {"tome": "test_baselines.py", "pumer": "test_baselines.py", "hsa": "test_baselines.py",
                  "positional": "test_positional.py"}


def test_every_method_has_a_decision_test():
    missing = sorted(set(vimtr.reduction.list_methods()) - set(HELD_HERE) - set(HELD_ELSEWHERE))
    assert not missing, (f"reduction method(s) {missing} have no test holding their defining decision: add one "
                         f"to tests/test_method_decisions.py (see CONTRIBUTING.md) and list it in HELD_HERE, or "
                         f"name the file that holds it in HELD_ELSEWHERE")
    assert all(callable(globals().get(name)) for name in HELD_HERE.values())
