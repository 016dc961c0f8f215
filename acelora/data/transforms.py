"""BiomedCLIP's image preprocessing, with the geometry exposed for boxes and masks."""
from __future__ import annotations

import numpy as np
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

# OpenAI CLIP's statistics, which BiomedCLIP's preprocess config uses.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class BiomedCLIPTransform:
    """PIL image → normalised float tensor [3, S, S], as open_clip preprocesses BiomedCLIP.

    Evaluation (and, by default, training): resize the shortest side to S (bicubic), center-crop
    S×S, scale to [0, 1], normalise with OpenAI CLIP's mean/std. ``train=True`` replaces the
    resize+crop by open_clip's training crop (RandomResizedCrop, scale 0.9–1.0, bicubic).

    :meth:`map_boxes` and :meth:`map_mask` apply the same (deterministic) geometry to xyxy boxes
    and to masks, so detection and segmentation targets line up with the image.
    """

    def __init__(self, image_size: int = 224, train: bool = False,
                 mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, scale=(0.9, 1.0)):
        if int(image_size) < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}")
        self.image_size = int(image_size)
        self.train = bool(train)
        self.mean, self.std = tuple(mean), tuple(std)
        self.scale = tuple(scale)
        if self.train:
            self._geometry = T.RandomResizedCrop(self.image_size, scale=self.scale,
                                                 interpolation=T.InterpolationMode.BICUBIC)
        else:
            self._geometry = T.Compose([
                T.Resize(self.image_size, interpolation=T.InterpolationMode.BICUBIC),
                T.CenterCrop(self.image_size),
            ])
        self._mean = np.asarray(self.mean, dtype=np.float32)
        self._std = np.asarray(self.std, dtype=np.float32)
        if self._mean.shape != (3,) or self._std.shape != (3,) or (self._std <= 0).any():
            raise ValueError(f"mean and std must be 3 numbers (std > 0), got {mean} and {std}")

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image, got {type(image).__name__}")
        image = self._geometry(image)
        if image.mode != "RGB":
            image = image.convert("RGB")
        # ToTensor + Normalize in NumPy: the same arithmetic, but single-threaded. Per-image
        # torch ops on a busy CPU pay intra-op thread start-up (several x slower in the main
        # process of a DataLoader without workers).
        array = np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1), dtype=np.float32)
        array /= 255.0
        array -= self._mean[:, None, None]
        array /= self._std[:, None, None]
        return torch.from_numpy(array)

    # --- geometry of the deterministic (evaluation) path
    def _resize_and_crop(self, width: int, height: int):
        """Resized size and crop offset, as torchvision's Resize(int) + CenterCrop compute them."""
        if self.train:
            raise ValueError("boxes/masks follow a random crop only through the image itself; "
                             "use train=False for targets")
        size = self.image_size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = size, int(size * long / short)
        new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
        top = int(round((new_h - size) / 2.0))
        left = int(round((new_w - size) / 2.0))
        return new_w, new_h, left, top

    def map_boxes(self, boxes: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """xyxy boxes in pixels of the original (width, height) image → pixels of the output.

        Boxes are clipped to the crop; a box with no area left inside it is dropped.
        """
        width, height = image_size
        new_w, new_h, left, top = self._resize_and_crop(width, height)
        boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
        scale = torch.tensor([new_w / width, new_h / height] * 2)
        offset = torch.tensor([left, top] * 2, dtype=torch.float32)
        out = (boxes * scale - offset).clamp(0, self.image_size)
        keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
        return out[keep]

    def map_mask(self, mask: np.ndarray | torch.Tensor) -> torch.Tensor:
        """A [H, W] mask → [S, S] bool, nearest-neighbour resize then the same center crop."""
        mask = torch.as_tensor(np.asarray(mask)).bool()
        if mask.ndim != 2:
            raise ValueError(f"mask must be [H, W], got shape {tuple(mask.shape)}")
        height, width = mask.shape
        new_w, new_h, left, top = self._resize_and_crop(width, height)
        resized = TF.resize(mask[None].to(torch.uint8), [new_h, new_w],
                            interpolation=T.InterpolationMode.NEAREST)[0]
        return resized[top:top + self.image_size, left:left + self.image_size].bool()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(image_size={self.image_size}, train={self.train}, "
                f"mean={self.mean}, std={self.std})")


def biomedclip_transform(image_size: int = 224, train: bool = False) -> BiomedCLIPTransform:
    """BiomedCLIP's preprocessing at ``image_size``; the same at train and test unless
    ``train=True`` (open_clip's mild RandomResizedCrop augmentation)."""
    return BiomedCLIPTransform(image_size=image_size, train=train)


def denormalize(images: torch.Tensor, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD) -> torch.Tensor:
    """Undo the normalisation (for viewing): [..., 3, H, W] back to [0, 1]."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images * s + m).clamp(0, 1)


__all__ = ["BiomedCLIPTransform", "biomedclip_transform", "denormalize", "OPENAI_CLIP_MEAN",
           "OPENAI_CLIP_STD"]
