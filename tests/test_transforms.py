"""vimtr.data.eval_transform: the official Vim / DeiT evaluation preprocessing."""
import pytest
import skimage.data
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode

import vimtr
from vimtr.data import eval_transform


def test_reproduces_the_golden_input_bit_exactly(golden_input):
    """chelsea + astronaut through the transform equal the official preprocessed input (golden README)."""
    transform = eval_transform("vim_tiny")
    images = [Image.fromarray(skimage.data.chelsea()).convert("RGB"),
              Image.fromarray(skimage.data.astronaut()).convert("RGB")]
    batch = torch.stack([transform(img) for img in images])
    assert batch.dtype == torch.float32 and batch.shape == golden_input.shape == (2, 3, 224, 224)
    assert torch.equal(batch, golden_input), f"max |diff| {(batch - golden_input).abs().max().item():.3g}"
    # A uint8 HWC array goes in directly too.
    assert torch.equal(transform(skimage.data.chelsea()), golden_input[0])


@pytest.mark.parametrize("name, img_size, resize", [
    ("vim_tiny", None, 256), ("vim_small_stride8", None, 256), ("videomamba_tiny", 448, 512),
    ("videomamba_small", 576, 658), ("vim_tiny", 64, 73),
])
def test_sizes_from_a_name(name, img_size, resize):
    transform = eval_transform(name, img_size=img_size)
    crop = img_size or 224
    resize_step, crop_step = transform.transforms[1], transform.transforms[2]
    assert isinstance(resize_step, transforms.Resize) and resize_step.size == resize
    assert resize_step.interpolation == InterpolationMode.BICUBIC
    assert isinstance(crop_step, transforms.CenterCrop) and tuple(crop_step.size) == (crop, crop)
    out = transform(Image.fromarray(skimage.data.astronaut()))
    assert out.shape == (3, crop, crop)


def test_size_from_a_model():
    model = vimtr.create_model("vim_tiny", depth=1, embed_dim=32, img_size=96)
    transform = eval_transform(model)
    assert transform.transforms[1].size == int(96 / 0.875)
    x = transform(skimage.data.chelsea()).unsqueeze(0)
    assert x.shape == (1, *model.input_size)
    with torch.no_grad():
        assert model.eval()(x).shape == (1, 1000)


def test_normalisation_is_imagenet():
    norm = eval_transform("vim_tiny").transforms[-1]
    assert isinstance(norm, transforms.Normalize)
    assert tuple(norm.mean) == (0.485, 0.456, 0.406) and tuple(norm.std) == (0.229, 0.224, 0.225)


def test_rejects_unknown_names_and_inputs():
    with pytest.raises(ValueError, match="unknown model"):
        eval_transform("vim_tinyy")
    with pytest.raises(TypeError, match="PIL image"):
        eval_transform("vim_tiny")([[0, 1], [2, 3]])
