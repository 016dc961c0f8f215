"""Synthetic chest X-rays: rendered images whose findings are visible, matching reports, and
writers that lay them out in each data set's official format (DESIGN §8).

Nothing here is meant to look real; it is meant to be *learnable*: every finding changes the
image in its own place and way (a wider heart, a bright blunted base, a dark rim without lung
markings, ...), so a model trained on the pairs can pick findings up, and zero-shot
classification over the finding names is meaningful. ``domain`` changes the acquisition
(contrast, gamma, noise, grid texture, blur) but not the anatomy, so a model adapted to one
domain sees a shift on another.

Everything is deterministic: the same ``rng`` state (or ``seed``) gives the same image.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from acelora.config import CHEXPERT_FINDINGS
from acelora.data.labels import CHEXPERT_5X200_CLASSES, NIH_FINDINGS

FIVE_CLASSES = CHEXPERT_5X200_CLASSES  # Atelectasis, Cardiomegaly, Consolidation, Edema, Pleural Effusion
NO_FINDING = "No Finding"
# Findings render_cxr knows how to draw (every CheXpert finding; "No Finding" draws nothing).
RENDERABLE = tuple(f for f in CHEXPERT_FINDINGS if f != NO_FINDING)
# NIH names that are not CheXpert names, drawn as their nearest CheXpert look-alike.
_ALIASES = {
    "Effusion": "Pleural Effusion", "Infiltration": "Lung Opacity", "Mass": "Lung Lesion",
    "Nodule": "Lung Lesion", "Emphysema": "Emphysema", "Fibrosis": "Lung Opacity",
    "Pleural_Thickening": "Pleural Other", "Hernia": "Hernia",
}


# --- acquisition domains ---------------------------------------------------------------------

@dataclass(frozen=True)
class Domain:
    """How one (imaginary) site acquires images: applied after the anatomy is drawn."""

    contrast: float = 1.0     # around mid-grey
    offset: float = 0.0       # brightness shift
    gamma: float = 1.0
    noise: float = 0.015      # std of additive Gaussian noise
    grid: float = 0.0         # amplitude of an anti-scatter-grid line texture
    blur: float = 0.0         # Gaussian blur radius, as a fraction of the image size
    vignette: float = 0.0     # darkening towards the corners


DOMAINS = {
    0: Domain(),
    1: Domain(contrast=0.75, offset=0.08, gamma=0.7, noise=0.04, grid=0.05, vignette=0.25),
    2: Domain(contrast=1.25, offset=-0.04, gamma=1.35, noise=0.008, blur=0.006),
}


def get_domain(domain: int | Domain) -> Domain:
    """The :class:`Domain` of an id (0, 1, 2 are fixed; any other int gets its own fixed draw)."""
    if isinstance(domain, Domain):
        return domain
    if not isinstance(domain, (int, np.integer)) or domain < 0:
        raise ValueError(f"domain must be a non-negative int or a Domain, got {domain!r}")
    if domain in DOMAINS:
        return DOMAINS[int(domain)]
    r = np.random.default_rng([7919, int(domain)])
    return Domain(contrast=float(r.uniform(0.7, 1.3)), offset=float(r.uniform(-0.06, 0.1)),
                  gamma=float(r.uniform(0.65, 1.4)), noise=float(r.uniform(0.005, 0.05)),
                  grid=float(r.choice([0.0, r.uniform(0.02, 0.06)])),
                  blur=float(r.choice([0.0, r.uniform(0.003, 0.008)])),
                  vignette=float(r.uniform(0.0, 0.3)))


# --- rendering ---------------------------------------------------------------------------------

def _soft(inside: np.ndarray, sharpness: float) -> np.ndarray:
    """A smooth 0→1 step of a signed "how far inside" field (positive inside)."""
    return 1.0 / (1.0 + np.exp(-np.clip(inside * sharpness, -40.0, 40.0)))


def _ellipse(X, Y, cx, cy, rx, ry, sharpness=12.0):
    d = ((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2
    return _soft(1.0 - d, sharpness)


def _gauss(X, Y, cx, cy, sx, sy):
    return np.exp(-0.5 * (((X - cx) / sx) ** 2 + ((Y - cy) / sy) ** 2))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Band-limited noise in [-1, 1]: a cells×cells random grid upsampled bicubically."""
    grid = rng.uniform(-1.0, 1.0, (cells, cells)).astype(np.float32)
    up = Image.fromarray(grid, mode="F").resize((size, size), Image.BICUBIC)
    return np.asarray(up, dtype=np.float64)


def _blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (edge-replicated), sigma in pixels."""
    radius = max(1, int(math.ceil(3 * sigma)))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / max(sigma, 1e-6)) ** 2)
    taps /= taps.sum()
    padded = np.pad(image, radius, mode="edge")
    rows = sum(w * padded[:, i:i + image.shape[1]] for i, w in enumerate(taps))
    return sum(w * rows[i:i + image.shape[0], :] for i, w in enumerate(taps))


def _canonical(finding: str) -> str:
    name = _ALIASES.get(finding, finding)
    if name not in RENDERABLE and name not in ("Emphysema", "Hernia", NO_FINDING):
        raise ValueError(f"unknown finding {finding!r}; expected one of {list(CHEXPERT_FINDINGS)} "
                         f"or an NIH name {list(NIH_FINDINGS)}")
    return name


def render_array(findings: Iterable[str], rng: np.random.Generator, size: int = 224,
                 domain: int | Domain = 0) -> np.ndarray:
    """The image of :func:`render_cxr` as float32 [size, size] in [0, 1] (white = dense)."""
    if int(size) < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    size = int(size)
    wanted = {_canonical(f) for f in findings}
    wanted.discard(NO_FINDING)
    dom = get_domain(domain)
    # Coordinates in [0, 1] (x to the image's right = the patient's left), pixel centres.
    axis = (np.arange(size) + 0.5) / size
    Y, X = np.meshgrid(axis, axis, indexing="ij")
    k = 6.0 + size / 16.0  # edge sharpness, in units of the normalised distance

    # Anatomy, jittered per patient. Draws happen in a fixed order whatever the findings, so
    # one patient (rng state) gives the same anatomy with and without a given finding.
    cx = 0.5 + rng.normal(0, 0.012)
    lung_rx = 0.155 + rng.normal(0, 0.008)
    lung_ry = 0.27 + rng.normal(0, 0.012)
    lung_cy = 0.47 + rng.normal(0, 0.012)
    lung_dx = 0.195 + rng.normal(0, 0.006)
    heart_rx = 0.115 + rng.normal(0, 0.006)
    heart_cy = 0.63 + rng.normal(0, 0.01)
    rib_phase = rng.uniform(0, 1)
    markings = 0.6 * _smooth_noise(rng, size, 12) + 0.4 * _smooth_noise(rng, size, 24)
    side_draws = rng.integers(0, 2, size=8)       # which lung each finding sits in
    pos_draws = rng.uniform(0, 1, size=(8, 4))    # where in it

    body = _ellipse(X, Y, cx, 0.62, 0.47, 0.62, k)
    img = 0.08 + 0.42 * body
    lungs = []
    for s, sign in enumerate((-1.0, 1.0)):
        lx = cx + sign * lung_dx
        rx = lung_rx * (1.0 if s == 0 else 0.94)  # the heart side is narrower
        lungs.append((lx, lung_cy, rx, lung_ry))
    lung_masks = [_ellipse(X, Y, lx, ly, rx, ry, k) for lx, ly, rx, ry in lungs]
    lung = np.maximum(*lung_masks)
    vessels = np.zeros_like(X)
    for lx, ly, rx, ry in lungs:
        # Lung markings: branching vessels brightest near the hilum, fading to the periphery.
        hx = cx + np.sign(lx - cx) * 0.07
        vessels += np.exp(-((X - hx) ** 2 + (Y - (ly + 0.02)) ** 2) / (2 * 0.12 ** 2))
    lung_texture = lung * (0.05 * markings + 0.07 * vessels * (0.6 + 0.4 * markings))
    img = img - 0.30 * lung + lung_texture

    # Ribs: posterior arcs sloping down laterally, brighter bands across both lungs.
    ribs = np.zeros_like(X)
    spacing = lung_ry * 2 / 7.0
    for i in range(8):
        y0 = lung_cy - lung_ry + (i + rib_phase * 0.5) * spacing
        y_rib = y0 + 0.35 * (X - cx) ** 2 / 0.2
        ribs += np.exp(-0.5 * ((Y - y_rib) / 0.011) ** 2)
    img = img + 0.07 * np.clip(ribs, 0, 1) * body * (0.4 + 0.6 * lung)

    # Mediastinum, spine and heart.
    medi_w = 0.075
    if "Enlarged Cardiomediastinum" in wanted:
        medi_w = 0.14
    upper = _soft(heart_cy - Y, 2 * k)
    mediastinum = _soft(1 - np.abs(X - cx) / medi_w, k / 2) * upper * _soft(Y - 0.1, 2 * k)
    spine = _soft(1 - np.abs(X - cx) / 0.03, k / 2) * body
    heart_w = heart_rx * (1.75 if "Cardiomegaly" in wanted else 1.0)
    heart = _ellipse(X, Y, cx + 0.035 + 0.2 * (heart_w - heart_rx), heart_cy, heart_w, 0.13, k)
    img = np.maximum(img, 0.5 * np.maximum(mediastinum, heart)) + 0.06 * spine

    def site(j: int, lo: float = 0.2, hi: float = 0.8):
        """A point inside one lung (side and position fixed per finding slot j)."""
        lx, ly, rx, ry = lungs[int(side_draws[j])]
        u, v = pos_draws[j, 0], pos_draws[j, 1]
        return (lx + (u - 0.5) * rx * 0.9, ly - ry + (lo + (hi - lo) * v) * 2 * ry, lx, ly, rx, ry)

    lesion = np.zeros_like(X)
    if "Pleural Effusion" in wanted:
        # Bright fluid in one lung's base, its meniscus rising laterally (blunted angle).
        lx, ly, rx, ry = lungs[int(side_draws[0])]
        level = ly + ry * (0.35 + 0.15 * pos_draws[0, 0])
        meniscus = level - 0.10 * np.clip(np.abs(X - lx) / rx, 0, 1.2) ** 2
        fluid = _soft(Y - meniscus, k * 1.5) * _ellipse(X, Y, lx, ly + 0.04, rx * 1.08, ry * 1.05, k)
        lesion = np.maximum(lesion, 0.40 * fluid)
    if "Consolidation" in wanted:
        px, py, *_ = site(1, 0.45, 0.85)
        blob = _ellipse(X, Y, px, py, 0.075, 0.065, k * 0.8) * lung
        lesion = np.maximum(lesion, 0.33 * blob * (0.9 + 0.1 * markings))
    if "Pneumonia" in wanted:
        px, py, *_ = site(2, 0.5, 0.85)
        patches = sum(_gauss(X, Y, px + 0.05 * math.cos(a), py + 0.04 * math.sin(a), 0.028, 0.028)
                      for a in (0.0, 2.1, 4.2))
        patchy = np.clip(patches, 0, 1) * np.clip(0.5 + markings, 0, 1) * lung
        lesion = np.maximum(lesion, 0.30 * patchy)
    if "Lung Opacity" in wanted:
        px, py, *_ = site(3, 0.3, 0.8)
        lesion = np.maximum(lesion, 0.18 * _gauss(X, Y, px, py, 0.08, 0.10) * lung)
    if "Edema" in wanted:
        # Bilateral perihilar haze ("bat wings") plus short horizontal septal lines at the bases.
        haze = sum(_gauss(X, Y, lx - np.sign(lx - cx) * 0.03, ly + 0.02, 0.09, 0.14)
                   for lx, ly, _, _ in lungs)
        lines = np.zeros_like(X)
        for lx, ly, rx, ry in lungs:
            edge = lx + np.sign(lx - cx) * rx * 0.7
            for t in range(3):
                lines += (_gauss(X, Y, edge, ly + ry * (0.3 + 0.12 * t), 0.03, 0.004))
        lesion = np.maximum(lesion, (0.22 * haze + 0.18 * np.clip(lines, 0, 1)) * lung)
    if "Atelectasis" in wanted:
        # A plate-like band, slightly tilted, in a lower zone.
        px, py, lx, ly, rx, ry = site(4, 0.55, 0.8)
        tilt = (pos_draws[4, 2] - 0.5) * 0.5
        dist = (Y - py) - tilt * (X - lx)
        band = np.exp(-0.5 * (dist / 0.018) ** 2) * _soft(1 - np.abs(X - lx) / (rx * 0.8), k)
        lesion = np.maximum(lesion, 0.32 * band * lung)
    if "Lung Lesion" in wanted:
        px, py, *_ = site(5, 0.2, 0.7)
        r = 0.028 + 0.012 * pos_draws[5, 2]
        lesion = np.maximum(lesion, 0.33 * _ellipse(X, Y, px, py, r, r, k * 1.5) * lung)
    if "Pleural Other" in wanted:
        lx, ly, rx, ry = lungs[int(side_draws[6])]
        edge = 1.0 - np.abs(np.sqrt(((X - lx) / rx) ** 2 + ((Y - ly) / ry) ** 2) - 0.97) / 0.05
        lateral = _soft(np.sign(lx - cx) * (X - lx) / rx, k)
        lesion = np.maximum(lesion, 0.25 * np.clip(edge, 0, 1) * lateral * _soft(ly + 0.1 - Y, k))
    img = img + lesion

    if "Pneumothorax" in wanted:
        # Collapsed lung: between the chest wall and the visceral pleural line the lung is
        # black and has no markings; the pleural line itself is a thin bright curve.
        s = int(side_draws[7])
        lx, ly, rx, ry = lungs[s]
        shrink = 0.62 + 0.15 * pos_draws[7, 0]
        clx = lx - np.sign(lx - cx) * rx * (1 - shrink) * 0.9
        d_in = np.sqrt(((X - clx) / (rx * shrink)) ** 2 + ((Y - ly - ry * (1 - shrink) * 0.5)
                                                          / (ry * (0.75 + 0.25 * shrink))) ** 2)
        collapsed = _soft(1.0 - d_in, k)
        rim = lung_masks[s] * (1.0 - collapsed)
        img = img - rim * (lung_texture + lesion + 0.1)
        img = img + 0.14 * np.exp(-0.5 * ((d_in - 1.0) / 0.025) ** 2) * lung_masks[s]
    if "Fracture" in wanted:
        # A displaced break in a rib: a dark gap and a bright step beside it.
        px, py, *_ = site(6, 0.15, 0.5)
        gap = _gauss(X, Y, px, py, 0.01, 0.035)
        img = img - 0.15 * gap + 0.25 * _gauss(X, Y, px + 0.02, py + 0.012, 0.015, 0.012)
    if "Support Devices" in wanted:
        # A tube down the midline and a line with a pacemaker-like box: near-white, thin.
        tube = np.exp(-0.5 * ((X - cx - 0.01) / 0.005) ** 2) * _soft(0.5 - Y, k * 2)
        box_x, box_y = (0.2, 0.2) if side_draws[5] else (0.8, 0.2)
        box = (np.abs(X - box_x) < 0.045) & (np.abs(Y - box_y) < 0.03)
        lead = np.exp(-0.5 * ((Y - (box_y + (X - box_x) * 0.6)) / 0.005) ** 2) * \
            (np.minimum(np.abs(X - box_x), np.abs(X - cx)) < np.abs(box_x - cx)) * \
            (np.sign(X - box_x) == np.sign(cx - box_x))
        img = np.maximum(img, 0.95 * np.maximum.reduce([tube, box.astype(np.float64), lead]))
    if "Emphysema" in wanted:
        img = img - 0.08 * lung  # hyperlucent lungs
    if "Hernia" in wanted:
        img = img + 0.2 * _ellipse(X, Y, cx, heart_cy + 0.02, 0.06, 0.05, k) * (0.6 + 0.4 * markings)

    # Acquisition (domain): the only draws after this point are the noise.
    out = np.clip(img, 0.0, 1.0)
    out = np.clip((out - 0.5) * dom.contrast + 0.5 + dom.offset, 0.0, 1.0) ** dom.gamma
    if dom.vignette:
        out = out * (1.0 - dom.vignette * ((X - 0.5) ** 2 + (Y - 0.5) ** 2) * 2)
    if dom.grid:
        period = max(2.0, size / 40.0)
        out = out + dom.grid * np.sin(2 * math.pi * np.arange(size) / period)[None, :]
    if dom.blur:
        out = _blur(out, dom.blur * size)
    if dom.noise:
        out = out + rng.normal(0.0, dom.noise, out.shape)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def render_cxr(findings: Iterable[str], rng: np.random.Generator, size: int = 224,
               domain: int | Domain = 0, mode: str = "RGB") -> Image.Image:
    """A chest-X-ray-like image showing ``findings`` (CheXpert names, or NIH names).

    ``rng`` fixes the patient (anatomy, where each finding sits) and the noise; ``domain`` the
    acquisition (see :data:`DOMAINS`). Returns a ``size``×``size`` PIL image, grey values in all
    three channels for ``mode="RGB"`` (what ``model.preprocess`` takes) or one for ``"L"``.
    """
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    array = render_array(findings, rng, size=size, domain=domain)
    image = Image.fromarray((array * 255.0 + 0.5).astype(np.uint8), mode="L")
    return image.convert("RGB") if mode == "RGB" else image


# --- reports -----------------------------------------------------------------------------------

_SENTENCES = {
    "Atelectasis": ["There is plate-like atelectasis at the {side} lung base.",
                    "Linear opacity at the {side} base, consistent with atelectasis."],
    "Cardiomegaly": ["The heart is enlarged.", "The cardiac silhouette is enlarged, consistent "
                     "with cardiomegaly."],
    "Consolidation": ["There is a focal consolidation in the {side} lower lung.",
                      "Dense consolidation is seen in the {side} lung."],
    "Edema": ["There is bilateral perihilar haziness with septal lines, consistent with "
              "pulmonary edema.", "Findings are consistent with moderate pulmonary edema."],
    "Enlarged Cardiomediastinum": ["The mediastinum is widened.",
                                   "The cardiomediastinal silhouette is enlarged."],
    "Fracture": ["There is a displaced fracture of a {side} posterior rib.",
                 "A {side} rib fracture is noted."],
    "Lung Lesion": ["There is a well-circumscribed nodule in the {side} lung.",
                    "A rounded lung lesion is seen in the {side} upper lung."],
    "Lung Opacity": ["There is an ill-defined opacity in the {side} lung.",
                     "Patchy lung opacity in the {side} mid zone."],
    "Pleural Effusion": ["There is a {side} pleural effusion with blunting of the costophrenic "
                         "angle.", "A moderate {side} pleural effusion is present."],
    "Pleural Other": ["There is {side} pleural thickening.",
                      "Lateral pleural thickening on the {side}."],
    "Pneumonia": ["Patchy airspace opacities in the {side} lower lobe are concerning for "
                  "pneumonia.", "Findings are compatible with {side} lower lobe pneumonia."],
    "Pneumothorax": ["There is a {side} pneumothorax with a visible pleural line.",
                     "A {side} apical pneumothorax is present."],
    "Support Devices": ["An endotracheal tube and a pacemaker are in place.",
                        "Support devices are in standard position."],
    "Emphysema": ["The lungs are hyperinflated, consistent with emphysema."],
    "Hernia": ["A hiatal hernia is seen behind the heart."],
}
_IMPRESSION = {
    "Atelectasis": "Atelectasis.", "Cardiomegaly": "Cardiomegaly.",
    "Consolidation": "Consolidation.", "Edema": "Pulmonary edema.",
    "Enlarged Cardiomediastinum": "Enlarged cardiomediastinum.", "Fracture": "Rib fracture.",
    "Lung Lesion": "Lung lesion.", "Lung Opacity": "Lung opacity.",
    "Pleural Effusion": "Pleural effusion.", "Pleural Other": "Pleural thickening.",
    "Pneumonia": "Pneumonia.", "Pneumothorax": "Pneumothorax.",
    "Support Devices": "Support devices in place.", "Emphysema": "Emphysema.",
    "Hernia": "Hiatal hernia.",
}
_NORMAL = ["The lungs are clear.", "Heart size is normal.", "The cardiomediastinal silhouette "
           "is within normal limits.", "No focal airspace disease.", "Osseous structures are intact."]
_NORMAL_IMPRESSION = ["No acute cardiopulmonary process.", "Normal chest radiograph.",
                      "No acute intrathoracic abnormality."]


def report_for(findings: Iterable[str], rng: np.random.Generator) -> str:
    """A short free-text report in MIMIC's layout (FINAL REPORT, INDICATION, FINDINGS, IMPRESSION).

    Each finding is named in both sections; a report without findings reads normal.
    """
    names = [n for n in dict.fromkeys(_canonical(f) for f in findings) if n != NO_FINDING]
    body, impression = [], []
    for name in names:
        side = ("right", "left")[int(rng.integers(0, 2))]
        options = _SENTENCES[name]
        body.append(options[int(rng.integers(0, len(options)))].format(side=side))
        impression.append(_IMPRESSION[name])
    n_normal = int(rng.integers(1, 3))
    for i in rng.permutation(len(_NORMAL))[:n_normal]:
        sentence = _NORMAL[int(i)]
        heart_named = any(n in ("Cardiomegaly", "Enlarged Cardiomediastinum") for n in names)
        if names and (("Heart" in sentence or "silhouette" in sentence) and heart_named
                      or ("clear" in sentence or "airspace" in sentence)):
            continue  # never contradict a finding
        body.append(sentence)
    if not impression:
        impression.append(_NORMAL_IMPRESSION[int(rng.integers(0, len(_NORMAL_IMPRESSION)))])
    indication = ("Shortness of breath.", "Cough and fever.", "Chest pain.",
                  "Evaluate for acute process.")[int(rng.integers(0, 4))]
    return ("                                 FINAL REPORT\n"
            " EXAMINATION:  CHEST (PA AND LAT)\n \n"
            f" INDICATION:  {indication}\n \n"
            " FINDINGS:\n \n " + _wrap(" ".join(body)) + "\n \n"
            " IMPRESSION:\n \n " + _wrap(" ".join(impression)) + "\n")


def _wrap(text: str, width: int = 78) -> str:
    # MIMIC reports are hard-wrapped; readers must undo it.
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "\n ".join(lines)


def labels_vector(findings: Iterable[str]) -> np.ndarray:
    """Multi-hot float32 [14] in CHEXPERT_FINDINGS order; "No Finding" set when none."""
    vec = np.zeros(len(CHEXPERT_FINDINGS), dtype=np.float32)
    index = {n: i for i, n in enumerate(CHEXPERT_FINDINGS)}
    for f in findings:
        name = _canonical(f)
        if name in index:
            vec[index[name]] = 1.0
    if not vec.any():
        vec[index[NO_FINDING]] = 1.0
    return vec


# --- the in-memory data set ------------------------------------------------------------------------

def _check_findings(findings: Sequence[str]) -> tuple[str, ...]:
    findings = tuple(findings)
    if not findings:
        raise ValueError("findings must name at least one finding")
    bad = [f for f in findings if f not in RENDERABLE]
    if bad:
        raise ValueError(f"findings {bad} are not CheXpert findings render_cxr draws; "
                         f"choose from {list(RENDERABLE)}")
    if len(set(findings)) != len(findings):
        raise ValueError(f"findings has duplicates: {list(findings)}")
    return findings


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
        self.findings = _check_findings(findings)
        self.include_normal = bool(include_normal)
        self.classes = ([NO_FINDING] if include_normal else []) + list(self.findings)
        self.transform = transform
        self.cache = cache
        self._images: dict[int, np.ndarray] = {}
        from acelora.data.reports import findings_impression, join_sections

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


# --- writers: synthetic data sets in their official layouts (DESIGN §8) -----------------------

def _to_uint8(array: np.ndarray) -> np.ndarray:
    return (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _write_csv(path: str, header: Sequence[str], rows: Iterable[Sequence], header_line: str | None = None):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        if header_line is not None:  # a header that csv would quote or that must stay verbatim
            f.write(header_line + "\n")
        writer = csv.writer(f, lineterminator="\n")
        if header_line is None:
            writer.writerow(header)
        writer.writerows(rows)


def write_dicom(path: str, image: np.ndarray, photometric: str = "MONOCHROME2", bits: int = 12,
                window: tuple[float, float] | None = None, rescale: tuple[float, float] = (1.0, 0.0),
                sop_instance_uid: str | None = None, patient_id: str = "anon") -> None:
    """Write ``image`` (float [H, W] in [0, 1], white = dense) as a 16-bit single-frame DICOM.

    ``bits`` stored bits (8..16) in 16 allocated; ``MONOCHROME1`` stores inverted values (a
    correct reader inverts them back); ``window`` (center, width) in output units after
    ``rescale`` (slope, intercept) is written as Window Center/Width.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, got {photometric!r}")
    if not 8 <= bits <= 16:
        raise ValueError(f"bits must be in 8..16, got {bits}")
    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError(f"image must be [H, W], got shape {image.shape}")
    top = 2 ** bits - 1
    stored = np.round(np.clip(image, 0.0, 1.0) * top).astype(np.uint16)
    if photometric == "MONOCHROME1":
        stored = (top - stored).astype(np.uint16)
    uid = sop_instance_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uid
    ds.PatientID = patient_id
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if rescale != (1.0, 0.0):
        ds.RescaleSlope, ds.RescaleIntercept = f"{rescale[0]:g}", f"{rescale[1]:g}"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = f"{window[0]:g}", f"{window[1]:g}"
    ds.PixelData = stored.astype("<u2").tobytes()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _pick_findings(rng: np.random.Generator, pool: Sequence[str], max_findings: int,
                   p_normal: float) -> list[str]:
    if rng.uniform() < p_normal or max_findings < 1:
        return []
    count = int(rng.integers(1, max_findings + 1))
    return [pool[int(i)] for i in sorted(rng.choice(len(pool), size=min(count, len(pool)), replace=False))]


def _digits(rng: np.random.Generator, first: int, n: int) -> str:
    return str(first) + "".join(str(int(d)) for d in rng.integers(0, 10, n - 1))


def write_mimic(root: str, n: int = 40, seed: int = 0, image_size: int = 64, domain: int = 0,
                findings: Sequence[str] = FIVE_CLASSES, max_findings: int = 2,
                p_normal: float = 0.25, reports: str = "both") -> dict:
    """A MIMIC-CXR-JPG tree of ``n`` studies under ``root``.

    Writes ``files/p{sid[:2]}/p{sid}/s{study}/{dicom_id}.jpg`` (one or two frontal images per
    study, sometimes a LATERAL one that readers must drop, and a few with a blank view),
    ``mimic-cxr-2.0.0-{metadata,split,chexpert}.csv`` (labels 1.0 for drawn findings; the others
    blank, 0.0 or -1.0), and the reports as ``files/p../p{sid}/s{study}.txt`` and/or
    ``mimic_cxr_sectioned.csv`` (``reports`` = "txt" | "csv" | "both").

    Returns the ground truth: ``studies[study_id] = dict(subject_id, split, findings, chexpert
    (finding → raw CSV value), findings_text, impression_text)`` and ``images[dicom_id] =
    dict(study_id, subject_id, view, path)``.
    """
    from acelora.data.reports import findings_impression

    if reports not in ("txt", "csv", "both"):
        raise ValueError(f"reports must be 'txt', 'csv' or 'both', got {reports!r}")
    pool = _check_findings(findings)
    rng = np.random.default_rng([seed, 101])
    studies, images = {}, {}
    meta_rows, split_rows, label_rows, section_rows = [], [], [], []
    subject = None
    used: set[str] = set()
    for s in range(int(n)):
        if subject is None or rng.uniform() < 0.5:  # about two studies per subject
            subject = _digits(rng, 1, 8)
            split = str(rng.choice(["train", "train", "train", "validate", "test"]))
        study = _digits(rng, 5, 8)
        while study in used:
            study = _digits(rng, 5, 8)
        used.add(study)
        drawn = _pick_findings(rng, pool, max_findings, p_normal)
        chexpert = {}
        for name in CHEXPERT_FINDINGS:
            if name in drawn:
                chexpert[name] = "1.0"
            elif name == NO_FINDING:
                chexpert[name] = "" if drawn else "1.0"
            else:
                chexpert[name] = str(rng.choice(["", "", "", "0.0", "-1.0"]))
        report = report_for(drawn, rng)
        f_text, i_text = findings_impression(report)
        rel_study = os.path.join("files", f"p{subject[:2]}", f"p{subject}", f"s{study}")
        if reports in ("txt", "both"):
            os.makedirs(os.path.join(root, os.path.dirname(rel_study)), exist_ok=True)
            with open(os.path.join(root, rel_study + ".txt"), "w", encoding="utf-8") as f:
                f.write(report)
        if reports in ("csv", "both"):
            section_rows.append([f"s{study}", i_text, f_text, i_text, ""])
        label_rows.append([subject, study] + [chexpert[name] for name in CHEXPERT_FINDINGS])
        studies[study] = {"subject_id": subject, "split": split, "findings": drawn,
                          "chexpert": chexpert, "findings_text": f_text, "impression_text": i_text}
        views = ["PA"] if rng.uniform() < 0.6 else ["AP"]
        if rng.uniform() < 0.25:
            views.append(views[0])  # a second frontal image of the same study
        if rng.uniform() < 0.5:
            views.append(str(rng.choice(["LATERAL", "LL"])))
        if rng.uniform() < 0.08:
            views.append("")  # unknown view: not frontal, dropped
        patient_rng = np.random.default_rng([seed, 103, s])
        for v, view in enumerate(views):
            dicom_id = "-".join(f"{int(x):08x}" for x in rng.integers(0, 2 ** 32, 5))
            rel = os.path.join(rel_study, f"{dicom_id}.jpg")
            array = render_array(drawn, np.random.default_rng([seed, 103, s]), image_size, domain) \
                if view in ("PA", "AP") else render_array(drawn, patient_rng, image_size, domain)[:, ::-1]
            path = os.path.join(root, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(_to_uint8(array), mode="L").save(path, quality=95)
            meta_rows.append([dicom_id, subject, study, "CHEST (PA AND LAT)", view, image_size,
                              image_size, "21800506", "213014.531", "Chest (PA and Lat)",
                              {"PA": "postero-anterior", "AP": "antero-posterior"}.get(view, "lateral"),
                              "Erect"])
            split_rows.append([dicom_id, study, subject, split])
            images[dicom_id] = {"study_id": study, "subject_id": subject, "view": view, "path": path}
    _write_csv(os.path.join(root, "mimic-cxr-2.0.0-metadata.csv"),
               ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription",
                "ViewPosition", "Rows", "Columns", "StudyDate", "StudyTime",
                "ProcedureCodeSequence_CodeMeaning", "ViewCodeSequence_CodeMeaning",
                "PatientOrientationCodeSequence_CodeMeaning"], meta_rows)
    _write_csv(os.path.join(root, "mimic-cxr-2.0.0-split.csv"),
               ["dicom_id", "study_id", "subject_id", "split"], split_rows)
    _write_csv(os.path.join(root, "mimic-cxr-2.0.0-chexpert.csv"),
               ["subject_id", "study_id", *CHEXPERT_FINDINGS], label_rows)
    if section_rows:
        _write_csv(os.path.join(root, "mimic_cxr_sectioned.csv"),
                   ["study", "impression", "findings", "last_paragraph", "comparison"], section_rows)
    return {"root": root, "studies": studies, "images": images}


def write_nih(root: str, n: int = 40, seed: int = 0, image_size: int = 64, domain: int = 0,
              max_findings: int = 2, p_normal: float = 0.3, test_fraction: float = 0.3) -> dict:
    """An NIH ChestX-ray14 tree: ``images/{patient:08d}_{follow:03d}.png``,
    ``Data_Entry_2017.csv`` (its exact header, "Finding Labels" joined by "|", "No Finding" for
    none) and ``train_val_list.txt`` / ``test_list.txt`` split by patient.

    Returns ``images[name] = dict(findings (NIH names), split, path)``.
    """
    rng = np.random.default_rng([seed, 201])
    images, rows, lists = {}, [], {"train_val": [], "test": []}
    patient, follow = 0, 0
    for i in range(int(n)):
        if patient == 0 or rng.uniform() < 0.6:
            patient += int(rng.integers(1, 5))
            follow = 0
            split = "test" if rng.uniform() < test_fraction else "train_val"
        else:
            follow += 1
        name = f"{patient:08d}_{follow:03d}.png"
        drawn = _pick_findings(rng, NIH_FINDINGS, max_findings, p_normal)
        path = os.path.join(root, "images", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        array = render_array(drawn, np.random.default_rng([seed, 203, i]), image_size, domain)
        Image.fromarray(_to_uint8(array), mode="L").save(path)
        rows.append([name, "|".join(drawn) if drawn else NO_FINDING, follow, patient,
                     int(rng.integers(20, 90)), str(rng.choice(["M", "F"])),
                     str(rng.choice(["PA", "AP"])), image_size, image_size, 0.143, 0.143, ""])
        lists[split].append(name)
        images[name] = {"findings": drawn, "split": split, "path": path}
    _write_csv(os.path.join(root, "Data_Entry_2017.csv"), (), rows,
               header_line="Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,"
                           "Patient Gender,View Position,OriginalImage[Width,Height],"
                           "OriginalImagePixelSpacing[x,y],")
    for split, names in lists.items():
        with open(os.path.join(root, f"{split}_list.txt"), "w") as f:
            f.write("".join(f"{name}\n" for name in names))
    return {"root": root, "images": images}


def write_chexpert5x200(root: str, n: int = 25, seed: int = 0, image_size: int = 64,
                        domain: int = 0) -> dict:
    """CheXpert 5×200 in GLoRIA's format: ``chexpert_5x200.csv`` (Path, Sex, Age,
    Frontal/Lateral, AP/PA and the 14 findings) with ``n`` rows per class (200 in the real set),
    each positive (1.0) for exactly one of the 5 classes; images under
    ``CheXpert-v1.0-small/valid/patient{id}/study1/view1_frontal.jpg``.

    Returns ``rows[path] = class name``.
    """
    rng = np.random.default_rng([seed, 301])
    out, rows = {}, []
    index = 0
    for c, cls in enumerate(FIVE_CLASSES):
        for _ in range(int(n)):
            index += 1
            rel = f"CheXpert-v1.0-small/valid/patient{64540 + index:05d}/study1/view1_frontal.jpg"
            values = {}
            for name in CHEXPERT_FINDINGS:
                if name == cls:
                    values[name] = "1.0"
                elif name in FIVE_CLASSES or name == NO_FINDING:
                    values[name] = str(rng.choice(["", "0.0"]))
                else:
                    values[name] = str(rng.choice(["", "", "0.0", "-1.0"]))
            array = render_array([cls], np.random.default_rng([seed, 303, index]), image_size, domain)
            path = os.path.join(root, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Image.fromarray(_to_uint8(array), mode="L").save(path, quality=95)
            rows.append([rel, str(rng.choice(["Male", "Female"])), int(rng.integers(20, 90)),
                         "Frontal", str(rng.choice(["AP", "PA"]))] + [values[f] for f in CHEXPERT_FINDINGS])
            out[rel] = cls
    # Shuffle so classes are not in blocks (a reader must not rely on order).
    order = rng.permutation(len(rows))
    _write_csv(os.path.join(root, "chexpert_5x200.csv"),
               ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_FINDINGS],
               [rows[int(i)] for i in order])
    return {"root": root, "rows": out}


def _dicom_style(rng: np.random.Generator) -> dict:
    """A random mix of what real DICOMs do: 12/16 bits, MONOCHROME1, a window, a rescale."""
    bits = int(rng.choice([12, 16]))
    style = {"bits": bits, "photometric": str(rng.choice(["MONOCHROME2", "MONOCHROME1"]))}
    if rng.uniform() < 0.5:
        top = 2 ** bits - 1
        style["window"] = (top / 2.0 + 0.5, float(top + 1))  # the full range: a lossless window
    return style


def _uid(rng: np.random.Generator) -> str:
    return "1.2.276.0.7230010.3.1.4.8323329." + ".".join(
        str(int(x)) for x in (rng.integers(1000, 32000), rng.integers(1.5e9, 1.6e9), rng.integers(1e5, 1e6)))


def write_rsna(root: str, n: int = 30, seed: int = 0, image_size: int = 128, domain: int = 0,
               p_positive: float = 0.4) -> dict:
    """RSNA Pneumonia Detection: ``stage_2_train_labels.csv`` (patientId,x,y,width,height,Target;
    one row per box, one row with empty box fields for Target=0),
    ``stage_2_detailed_class_info.csv`` and ``stage_2_train_images/{patientId}.dcm`` (16-bit,
    some MONOCHROME1, some windowed). Each box is a visible opacity in the image.

    Returns ``patients[pid] = dict(target, boxes [[x, y, w, h], ...], path, dicom style)``.
    """
    rng = np.random.default_rng([seed, 401])
    patients, rows, info = {}, [], []
    for i in range(int(n)):
        pid = "-".join(f"{int(x):0{w}x}" for x, w in zip(rng.integers(0, 2 ** 32, 5),
                                                         (8, 4, 4, 4, 12)))
        patient_rng = np.random.default_rng([seed, 403, i])
        array = render_array([], patient_rng, image_size, domain).astype(np.float64)
        target = int(rng.uniform() < p_positive)
        boxes = []
        if target:
            for side in rng.permutation(2)[: int(rng.integers(1, 3))]:
                w = float(round(image_size * rng.uniform(0.12, 0.2)))
                h = float(round(image_size * rng.uniform(0.15, 0.28)))
                x = float(round(image_size * (0.18 if side == 0 else 0.55) + rng.uniform(0, 0.1) * image_size))
                y = float(round(image_size * rng.uniform(0.3, 0.5)))
                boxes.append([x, y, w, h])
                axis = np.arange(image_size) + 0.5
                Y, X = np.meshgrid(axis, axis, indexing="ij")
                blob = _gauss(X, Y, x + w / 2, y + h / 2, w / 3.5, h / 3.5)
                array = array + 0.3 * blob * (0.8 + 0.2 * _smooth_noise(patient_rng, image_size, 16))
        style = _dicom_style(rng)
        path = os.path.join(root, "stage_2_train_images", f"{pid}.dcm")
        write_dicom(path, np.clip(array, 0, 1), patient_id=pid, **style)
        if boxes:
            rows += [[pid, *(f"{v:.1f}" for v in box), 1] for box in boxes]
        else:
            rows.append([pid, "", "", "", "", 0])
        info.append([pid, "Lung Opacity" if target else
                     str(rng.choice(["Normal", "No Lung Opacity / Not Normal"]))])
        patients[pid] = {"target": target, "boxes": boxes, "path": path, **style}
    _write_csv(os.path.join(root, "stage_2_train_labels.csv"),
               ["patientId", "x", "y", "width", "height", "Target"], rows)
    _write_csv(os.path.join(root, "stage_2_detailed_class_info.csv"), ["patientId", "class"], info)
    return {"root": root, "patients": patients}


def write_siim(root: str, n: int = 20, seed: int = 0, image_size: int = 128, domain: int = 0,
               p_positive: float = 0.5) -> dict:
    """SIIM-ACR Pneumothorax: ``train-rle.csv`` with the header "ImageId, EncodedPixels", values
    written as the release does (a leading space; " -1" for no pneumothorax), one row per mask
    component so an image may have several rows (their masks overlap: readers must OR them);
    DICOMs at ``dicom-images-train/{study uid}/{series uid}/{ImageId}.dcm`` (16-bit, some
    MONOCHROME1). The release's images are 1024×1024; ``image_size`` keeps tests small (the RLE
    is column-major on the image's own size).

    Returns ``images[image_id] = dict(mask bool [H, W] (the union), components [masks], path)``.
    """
    from acelora.data.rle import rle_encode

    rng = np.random.default_rng([seed, 501])
    images, rows = {}, []
    axis = np.arange(image_size) + 0.5
    Y, X = np.meshgrid(axis / image_size, axis / image_size, indexing="ij")
    for i in range(int(n)):
        image_id = _uid(rng)
        patient_rng = np.random.default_rng([seed, 503, i])
        array = render_array([], patient_rng, image_size, domain).astype(np.float64)
        components = []
        if rng.uniform() < p_positive:
            # A dark apical/lateral rim (pneumothorax), sometimes split into overlapping parts.
            side = int(rng.integers(0, 2))
            cx = 0.3 if side == 0 else 0.7
            for _ in range(int(rng.integers(1, 4))):
                ex, ey = cx + rng.uniform(-0.05, 0.05), rng.uniform(0.25, 0.45)
                component = (((X - ex) / rng.uniform(0.05, 0.12)) ** 2
                             + ((Y - ey) / rng.uniform(0.06, 0.15)) ** 2) < 1.0
                if component.any():
                    components.append(component)
            mask = np.logical_or.reduce(components) if components else np.zeros_like(X, bool)
            array = np.where(mask, array * 0.45, array)
        mask = np.logical_or.reduce(components) if components else np.zeros(X.shape, bool)
        style = _dicom_style(rng)
        study, series = _uid(rng), _uid(rng)
        path = os.path.join(root, "dicom-images-train", study, series, f"{image_id}.dcm")
        write_dicom(path, np.clip(array, 0, 1), sop_instance_uid=image_id, patient_id=image_id, **style)
        if components:
            rows += [[image_id, " " + rle_encode(c)] for c in components]
        else:
            rows.append([image_id, " -1"])
        images[image_id] = {"mask": mask, "components": components, "path": path, **style}
    order = rng.permutation(len(rows))  # rows of one image need not be adjacent
    _write_csv(os.path.join(root, "train-rle.csv"), (), [rows[int(i)] for i in order],
               header_line="ImageId, EncodedPixels")
    return {"root": root, "images": images}


__all__ = ["FIVE_CLASSES", "RENDERABLE", "DOMAINS", "Domain", "get_domain", "render_array",
           "render_cxr", "report_for", "labels_vector", "SyntheticCXRPairs", "write_dicom",
           "write_mimic", "write_nih", "write_chexpert5x200", "write_rsna", "write_siim"]
