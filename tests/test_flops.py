"""FLOPs conventions against the published numbers."""
import pytest

import vimtr


@pytest.mark.parametrize("name,r,gflops", [("vim_tiny", 5, "1.28"), ("vim_small", 11, "3.58"),
                                           ("vim_base", 11, "13.21")])
def test_rmeeto_convention_reproduces_published_numbers(name, r, gflops):
    model = vimtr.reduce(vimtr.create_model(name), "rmeeto", r=r)
    assert f"{vimtr.flops(model, convention='rmeeto') / 1e9:.2f}" == gflops


@pytest.mark.parametrize("name,gflops", [("videomamba_tiny", "1.07"), ("videomamba_small", "4.24"),
                                         ("videomamba_middle", "12.64"), ("videomamba_base", "16.85")])
def test_fvcore_convention_reproduces_videomamba_zoo(name, gflops):
    assert f"{vimtr.flops(vimtr.create_model(name), convention='fvcore') / 1e9:.2f}" == gflops


def test_full_counts_both_directions_and_overhead():
    m = vimtr.create_model("vim_tiny")
    full, one = vimtr.flops(m), vimtr.flops(m, convention="rmeeto")
    assert full > one
    vimtr.reduce(m, "rmeeto", r=11)
    reduced = vimtr.flops(m)
    assert reduced < full
    # The overhead is counted: the same token counts with no merge cost would be cheaper.
    from vimtr.flops import count_flops
    assert count_flops(m, m.reducer.lengths, m.reducer.applied, None, "full") < reduced


def test_input_size_and_convention_checks():
    m = vimtr.create_model("vim_tiny")
    assert vimtr.flops(m, input_size=(1, 3, 224, 224)) == vimtr.flops(m)
    with pytest.raises(ValueError, match="processes inputs of size"):
        vimtr.flops(m, input_size=(3, 448, 448))
    with pytest.raises(ValueError, match="convention"):
        vimtr.flops(m, convention="mmcv")
