"""BiomedCLIP preprocessing against a hand-written PIL pipeline; boxes and masks follow the image."""
import numpy as np
import pytest
import torch
from PIL import Image

from acelora.data.transforms import (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, biomedclip_transform,
                                     denormalize)


def naive_preprocess(image: Image.Image, size: int) -> np.ndarray:
    """Shortest side → size (bicubic), centre crop, [0, 1], OpenAI CLIP mean/std; float64."""
    w, h = image.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    resized = image.convert("RGB").resize((new_w, new_h), Image.BICUBIC)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    crop = np.asarray(resized, dtype=np.float64)[top:top + size, left:left + size] / 255.0
    mean, std = np.array(OPENAI_CLIP_MEAN), np.array(OPENAI_CLIP_STD)
    return ((crop - mean) / std).transpose(2, 0, 1)


@pytest.mark.parametrize("wh", [(50, 80), (90, 40), (64, 64), (33, 31)])
def test_matches_naive_pipeline(wh):
    rng = np.random.default_rng()
    image = Image.fromarray(rng.integers(0, 256, (wh[1], wh[0]), dtype=np.uint8), mode="L")
    out = biomedclip_transform(32)(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    ref = naive_preprocess(image, 32)
    rel = np.linalg.norm(out.double().numpy() - ref) / np.linalg.norm(ref)
    assert rel < 2e-2  # torchvision's and PIL's bicubic differ only by rounding at the edges
    # Same at train and test unless asked.
    assert torch.equal(biomedclip_transform(32)(image), out)


def test_default_is_224_and_denormalize():
    t = biomedclip_transform()
    assert t.image_size == 224 and not t.train
    image = Image.new("RGB", (300, 260), (128, 64, 200))
    out = t(image)
    assert out.shape == (3, 224, 224)
    back = denormalize(out)
    expected = torch.tensor([128, 64, 200]) / 255.0
    torch.testing.assert_close(back[:, 100, 100], expected, atol=1e-5, rtol=0)


def test_train_mode_random_but_shaped():
    t = biomedclip_transform(24, train=True)
    image = Image.fromarray(np.random.default_rng().integers(0, 256, (40, 50, 3), dtype=np.uint8))
    assert t(image).shape == (3, 24, 24)
    with pytest.raises(ValueError, match="train=False"):
        t.map_boxes(torch.zeros(1, 4), (50, 40))


def test_boxes_and_mask_follow_the_image():
    # A white rectangle on black: after the transform, the bright pixels, the mapped box and the
    # mapped mask must coincide.
    w, h, size = 120, 80, 40
    x0, y0, x1, y1 = 30, 20, 70, 60
    array = np.zeros((h, w), dtype=np.uint8)
    array[y0:y1, x0:x1] = 255
    mask = array > 0
    t = biomedclip_transform(size)
    image = denormalize(t(Image.fromarray(array)))[0]
    box = t.map_boxes(torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32), (w, h))
    mapped = t.map_mask(mask)
    assert mapped.shape == (size, size) and mapped.dtype == torch.bool
    bright = image > 0.5
    assert (bright == mapped).float().mean() > 0.97
    ys, xs = torch.nonzero(mapped, as_tuple=True)
    torch.testing.assert_close(box[0], torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1],
                                                    dtype=torch.float32), atol=1.0, rtol=0)
    # Boxes falling outside the crop are dropped; partly outside are clipped.
    out = t.map_boxes(torch.tensor([[0, 0, 15, 10], [0, 0, 60, 40]], dtype=torch.float32), (w, h))
    assert out.shape == (1, 4) and out[0, 0] == 0


def test_bad_input():
    with pytest.raises(ValueError, match="image_size"):
        biomedclip_transform(0)
    with pytest.raises(TypeError, match="PIL"):
        biomedclip_transform(8)(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="mask"):
        biomedclip_transform(8).map_mask(np.zeros((2, 3, 4)))
