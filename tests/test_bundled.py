"""The bundled demo model's dataset ``digits-clutter`` (split discipline, placement, clutter) and the model
against its card."""
import json

import pytest
import torch

import vimtr
from vimtr.data import clutter, digits
from vimtr.data.folders import load_dataset

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_test_split_is_fixed_and_has_the_digits_test_labels():
    x, y = clutter.clutter_tensors("test")
    x2, y2 = clutter.clutter_tensors("test")
    assert x.shape == (360, 1, 48, 48) and x.dtype == torch.float32
    assert torch.equal(x, x2) and torch.equal(y, y2)  # drawn from a fixed seed
    assert torch.equal(y, digits.digits_tensors("test")[1])
    ds = load_dataset("digits-clutter", "val")
    assert len(ds) == 360 and ds.classes == [str(i) for i in range(10)] and ds.root == "digits-clutter"
    assert torch.equal(ds.tensors[0], x)
    assert len(load_dataset("digits-clutter", "train")) == 1437


def test_train_and_test_digits_are_disjoint_and_fragments_stay_in_their_split(monkeypatch):
    """No test digit in training, not even as a fragment: each split's canvases take their fragments
    from that split's digits."""
    _, _, splits = digits._load()
    assert not set(splits["train"]) & set(splits["test"])
    assert len(splits["train"]) + len(splits["test"]) == 1797
    seen = {}
    real = clutter.render

    def spy(images, pool, generator, own=None):
        seen.setdefault("pools", []).append(pool)
        return real(images, pool, generator, own)

    monkeypatch.setattr(clutter, "render", spy)
    for split in ("train", "test"):
        seen.clear()
        clutter.render_split(split, torch.Generator().manual_seed(0))
        assert torch.equal(seen["pools"][0], clutter._split_digits(split)[0]), split
        seen.clear()
        reader = clutter.ClutterDigits(split)
        reader[3]
        assert torch.equal(seen["pools"][0], clutter._split_digits(split)[0]), split


def test_an_image_never_takes_a_fragment_of_its_own_digit():
    pool = clutter._split_digits("test")[0][:10]
    image = pool[3:4]
    without_own = pool.clone()
    without_own[3] = 0
    for seed in range(20):
        a = clutter.render(image, pool, torch.Generator().manual_seed(seed), torch.tensor([3]))
        b = clutter.render(image, without_own, torch.Generator().manual_seed(seed), torch.tensor([3]))
        assert torch.equal(a, b), seed


def _layers(monkeypatch, n=360, seed=0):
    """(digit-only canvases, fragment-only ink) of the same draws: no texture, no noise."""
    monkeypatch.setattr(clutter, "TEXTURE", (0.0, 0.0))
    monkeypatch.setattr(clutter, "NOISE", 0.0)
    images = clutter._split_digits("test")[0][:n]
    own = torch.arange(n)
    digit = clutter.render(images, torch.zeros_like(images), torch.Generator().manual_seed(seed), own)
    both = clutter.render(images, images, torch.Generator().manual_seed(seed), own)
    return digit[:, 0], (both - digit)[:, 0]


def test_the_digit_is_anywhere_and_the_fragments_off_it(monkeypatch):
    digit, fragments = _layers(monkeypatch)
    ink = digit > 0.3
    assert ink.flatten(1).any(1).all()  # every canvas shows its digit
    # Position carries no answer: the digit reaches every row band of patches (4 px) in some image, and
    # even the central band is background in some (digits of 18-28 px on 48: it holds ink in ~93%).
    rows = ink.any(2).float()  # (N, 48)
    bands = rows.view(-1, 12, 4).amax(-1)
    assert bands.any(0).all() and bands.mean(0).min() > 0.1 and bands.mean(0).max() < 0.95
    cols = ink.any(1).float().view(-1, 12, 4).amax(-1)
    assert cols.any(0).all()
    # The top-left patch rows hold digit ink in a good share of images (never on 'digits').
    assert bands[:, 0].mean() > 0.1
    # Fragments: most canvases have some; they never draw over the digit's strokes.
    assert (fragments.flatten(1).amax(1) > 0.3).float().mean() > 0.8
    assert (torch.minimum(digit, fragments) > 0.05).sum() == 0


def test_training_reads_are_fresh_and_seeded():
    reader = clutter.ClutterDigits("train")
    torch.manual_seed(0)
    a, ya = reader[7]
    b, yb = reader[7]
    torch.manual_seed(0)
    a2, _ = reader[7]
    assert a.shape == (1, 48, 48) and ya == yb == clutter._split_digits("train")[1][7]
    assert not torch.equal(a, b) and torch.equal(a, a2)


def test_bad_split_names_the_choices():
    with pytest.raises(ValueError, match="'train' or 'test'"):
        clutter.clutter_tensors("val")


def test_bundled_model_against_its_card():
    """The shipped model: >= 97% top-1 on the fixed test split, the card's number, config and data (the
    card's data description is the one the training script writes for today's clutter settings: a changed
    dataset makes the card stale), 100+ patch tokens, a small asset."""
    from vimtr.models.checkpoint import assets_dir
    from vimtr.tools.train_digits import describe_data

    model = vimtr.load_model("vim_digits_clutter")
    card = json.loads((assets_dir() / "vim_digits_clutter.json").read_text())
    x, y = clutter.clutter_tensors("test")
    with torch.no_grad():
        acc = (model(x).argmax(-1) == y).float().mean().item()
    assert acc >= 0.97
    assert abs(acc - card["test_top1"]) <= 2 / len(y)  # up to kernel rounding
    assert model.num_patches == 144 and card["config"]["img_size"] == 48 and card["config"]["patch_size"] == 4
    assert card["config"] == {k: model.config[k] for k in card["config"]}
    assert card["dataset"] == describe_data("digits-clutter", 1437, 360, "default")
    training = card["training"]
    assert training["command"].startswith("python -m vimtr.tools.train_digits")
    assert isinstance(training["seed"], int) and training["minutes"] > 0 and training["epochs"] >= 1
    assert (assets_dir() / "vim_digits_clutter.safetensors").stat().st_size <= 2 * 2 ** 20
