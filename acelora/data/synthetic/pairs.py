"""``SyntheticCXRPairs``: an in-memory image–report data set of rendered chest X-rays."""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from acelora.data.reports import findings_impression, join_sections
from acelora.data.synthetic.render import (FIVE_CLASSES, NO_FINDING, Domain, check_findings,
                                           get_domain, render_array)
from acelora.data.synthetic.report_text import labels_vector, report_for

class SyntheticCXRPairs(Dataset):
    """``n`` in-memory image–report pairs; each image shows none or exactly one of ``findings``.

    Item (the data contract): ``image`` FloatTensor[3, S, S], ``text`` (FINDINGS + IMPRESSION of
    :func:`report_for`, as :class:`MimicCXRDataset` gives it), ``labels`` FloatTensor[14]
    (CheXpert order, "No Finding" = 1 for normal images), ``path`` (a ``synthetic://`` name) and
    ``label`` int, the index into :attr:`classes` (``["No Finding", *findings]``, or just
    ``findings`` with ``include_normal=False``).

    Sample ``i`` depends only on ``(seed, i)``: its findings, anatomy and report are the same in
    every ``domain``; only the acquisition differs. Without a ``transform`` the image is rendered
    at ``image_size`` and normalised with OpenAI CLIP's mean/std (what BiomedCLIP expects);
    ``transform`` (e.g. ``model.preprocess``) takes the rendered PIL image instead.
    """

    def __init__(self, n: int, image_size: int = 64, domain: int | Domain = 0, seed: int = 0,
                 findings: Sequence[str] = FIVE_CLASSES, transform: Callable | None = None,
                 include_normal: bool = True, cache: bool = False):
        if int(n) < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        self.n, self.image_size, self.seed = int(n), int(image_size), int(seed)
        self.domain = domain
        get_domain(domain)  # validate early
        self.findings = check_findings(findings)
        self.include_normal = bool(include_normal)
        self.classes = ([NO_FINDING] if include_normal else []) + list(self.findings)
        self.transform = transform
        self.cache = cache
        self._images: dict[int, np.ndarray] = {}
        self.label_ids, self.texts, self._seeds = [], [], []
        for i in range(self.n):
            rng = np.random.default_rng([self.seed, i])
            label = int(rng.integers(0, len(self.classes)))
            self.label_ids.append(label)
            self.texts.append(join_sections(*findings_impression(report_for(self._of(label), rng))))
            self._seeds.append(int(rng.integers(0, 2 ** 63 - 1)))
        self.labels = torch.from_numpy(np.stack([labels_vector(self._of(c)) for c in self.label_ids]))

    def _of(self, label: int) -> list[str]:
        name = self.classes[label]
        return [] if name == NO_FINDING else [name]

    def findings_of(self, index: int) -> list[str]:
        return self._of(self.label_ids[index])

    @property
    def targets(self) -> list[int]:
        return list(self.label_ids)

    def __len__(self) -> int:
        return self.n

    def render(self, index: int) -> Image.Image:
        """The PIL image of item ``index`` (RGB, ``image_size`` square)."""
        if self.cache and index in self._images:
            array = self._images[index]
        else:
            rng = np.random.default_rng([self._seeds[index], 1])
            array = render_array(self.findings_of(index), rng, self.image_size, self.domain)
            array = (array * 255.0 + 0.5).astype(np.uint8)
            if self.cache:
                self._images[index] = array
        return Image.fromarray(array, mode="L").convert("RGB")

    def __getitem__(self, index: int) -> dict:
        if index < 0:
            index += self.n
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} items")
        image = self.render(index)
        if self.transform is not None:
            tensor = self.transform(image)
        else:
            from acelora.data.transforms import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

            array = np.ascontiguousarray(np.asarray(image).transpose(2, 0, 1), dtype=np.float32) / 255.0
            mean = np.asarray(OPENAI_CLIP_MEAN, dtype=np.float32)[:, None, None]
            std = np.asarray(OPENAI_CLIP_STD, dtype=np.float32)[:, None, None]
            tensor = torch.from_numpy((array - mean) / std)
        domain = self.domain if isinstance(self.domain, int) else "custom"
        return {"image": tensor.contiguous(), "text": self.texts[index],
                "labels": self.labels[index].clone(), "label": self.label_ids[index],
                "path": f"synthetic://domain{domain}/seed{self.seed}/{index}",
                "id": f"syn-{self.seed}-{index}"}
