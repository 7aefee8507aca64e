"""Parity with the official implementations (hustvl/Vim, NUS-HPC-AI-Lab/R-MeeTo) on the golden cases."""
import json

import pytest
import torch

import vimtr
from conftest import GOLDEN, assert_close_golden, golden_weights


def _model(case):
    model = vimtr.create_model("vim_tiny").eval()
    model.load_state_dict(golden_weights(case), strict=True)
    return model


@pytest.mark.parametrize("case", ["p1", "p1b"])
def test_backbone_reproduces_official(case, golden, golden_input):
    model, ref = _model(case), golden[case]
    out = _outputs(model, golden_input)
    assert out["cls_index"] == 98
    for key in ("embed", "layer0_mixer_out", "final_norm", "features", "logits"):
        assert_close_golden(out[key], ref[key], key)


def _outputs(model, x) -> dict:
    """The golden files' checkpoints of one forward: patch + position embedding, block 0's mixer output, the
    final norm, the class-token features and the logits (the model's own forward must give these logits)."""
    captured = {}
    hook = model.layers[0].mixer.register_forward_hook(lambda m, i, o: captured.update(mixer=o[0]))  # returns None
    with torch.no_grad():
        embed = model.embed(x)
        state = model.forward_tokens(x)
        features = state.hidden[:, state.cls_index]
        logits = model.head(features)
        assert torch.equal(model(x), logits)
    hook.remove()
    return {"embed": embed, "layer0_mixer_out": captured["mixer"], "final_norm": state.hidden,
            "features": features, "logits": logits, "cls_index": state.cls_index}


@pytest.mark.parametrize("case,weights", [("p2", "p1"), ("p2b", "p1b")])
def test_rmeeto_reproduces_official(case, weights, golden, golden_input):
    meta = json.loads((GOLDEN / f"{'p2_rmeeto_tiny_r11' if case == 'p2' else 'p2b_rmeeto_tiny_r11_perturbed'}.json")
                      .read_text())
    model = vimtr.reduce(_model(weights), "rmeeto", r=11, compare=11)  # the golden merge_para
    with torch.no_grad():
        state = model.forward_tokens(golden_input)
        logits = model.head(state.hidden[:, state.cls_index])
    trace = model.reduction_trace
    assert trace["tokens"] == meta["seq_len_after_each_block"]
    assert trace["cls_index"] == meta["cls_index_after_each_block"]
    assert torch.equal(trace["sizes"], golden[case]["token_sizes_final"])
    assert_close_golden(state.hidden[:, state.cls_index], golden[case]["features"], "features")
    assert_close_golden(logits, golden[case]["logits"], "logits")
    # The official analytic counter's value for this case.
    assert vimtr.flops(model, convention="rmeeto") == 1_037_488_512
    # Constant r (compare=None, the published method) is the same schedule at r = 11.
    vimtr.reduce(model, "rmeeto", r=11)
    with torch.no_grad():
        assert torch.equal(model(golden_input), logits)


# ---------------------------------------------------------------------------------------------- P3: video
P3 = "p3_videomamba_video_tiny_f8"
P3_OVERRIDES = dict(depth=12, num_frames=8, img_size=112, num_classes=400)  # the case's constructor


@pytest.fixture(scope="module")
def p3():
    """The P3 case. Its ``input`` is not in the repository's copy (it would take the file over 10 MB): the
    golden README gives its recipe, ``torch.manual_seed(123); torch.randn(2, 3, 8, 112, 112)``, and the
    shared file's tensor was checked equal to it when the copy was made."""
    from safetensors.torch import load_file

    case = load_file(GOLDEN / f"{P3}.safetensors")
    case["input"] = torch.randn(2, 3, 8, 112, 112, generator=torch.Generator().manual_seed(123))
    return case


def _p3_state_dict(p3):
    return {k[8:]: v.float() for k, v in p3.items() if k.startswith("weights.")}


def test_videomamba_video_reproduces_official(p3):
    """OpenGVLab/VideoMamba video_sm VisionMamba (K400 classifier): class token first, frame-major tokens,
    spatial + temporal position embeddings, directions summed; the golden README's tolerance."""
    meta = json.loads((GOLDEN / f"{P3}.json").read_text())
    model = vimtr.create_model("videomamba_video_tiny", **P3_OVERRIDES).eval()
    model.load_state_dict(_p3_state_dict(p3), strict=True)
    x = p3["input"]
    assert model.num_tokens == meta["seq_len"] == 393
    out = _outputs(model, x)
    assert out["cls_index"] == meta["cls_index"] == 0
    for key in ("embed", "layer0_mixer_out", "features", "logits"):
        assert_close_golden(out[key], p3[key], key)


def test_videomamba_video_flat_checkpoint_loads_by_shape(p3, tmp_path):
    """Official video checkpoints are flat state dicts: the architecture (depth, frames, size, classes) comes
    from the shapes, with or without the registered name, and the outputs are the golden ones."""
    path = tmp_path / "videomamba_t16_k400_f8_res112.pth"
    torch.save(_p3_state_dict(p3), path)
    for name in (None, "videomamba_video_tiny"):
        model = vimtr.load_model(path, name=name)
        assert {k: model.config[k] for k in P3_OVERRIDES} == P3_OVERRIDES
        with torch.no_grad():
            assert_close_golden(model(p3["input"]), p3["logits"], f"logits (name={name})")
