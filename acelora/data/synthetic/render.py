"""Rendering of the synthetic chest X-rays: anatomy, one visible sign per finding, and the
acquisition domain (contrast, gamma, noise, grid texture, blur) applied on top.

Everything is deterministic: the same ``rng`` state gives the same image.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

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


def gauss(X, Y, cx, cy, sx, sy):
    return np.exp(-0.5 * (((X - cx) / sx) ** 2 + ((Y - cy) / sy) ** 2))


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
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


def canonical_finding(finding: str) -> str:
    name = _ALIASES.get(finding, finding)
    if name not in RENDERABLE and name not in ("Emphysema", "Hernia", NO_FINDING):
        raise ValueError(f"unknown finding {finding!r}; expected one of {list(CHEXPERT_FINDINGS)} "
                         f"or an NIH name {list(NIH_FINDINGS)}")
    return name


def check_findings(findings: Sequence[str]) -> tuple[str, ...]:
    """``findings`` as a tuple, checked: non-empty CheXpert findings this module draws, no repeats."""
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


def render_array(findings: Iterable[str], rng: np.random.Generator, size: int = 224,
                 domain: int | Domain = 0) -> np.ndarray:
    """The image of :func:`render_cxr` as float32 [size, size] in [0, 1] (white = dense)."""
    if int(size) < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    size = int(size)
    wanted = {canonical_finding(f) for f in findings}
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
    markings = 0.6 * smooth_noise(rng, size, 12) + 0.4 * smooth_noise(rng, size, 24)
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
        patches = sum(gauss(X, Y, px + 0.05 * math.cos(a), py + 0.04 * math.sin(a), 0.028, 0.028)
                      for a in (0.0, 2.1, 4.2))
        patchy = np.clip(patches, 0, 1) * np.clip(0.5 + markings, 0, 1) * lung
        lesion = np.maximum(lesion, 0.30 * patchy)
    if "Lung Opacity" in wanted:
        px, py, *_ = site(3, 0.3, 0.8)
        lesion = np.maximum(lesion, 0.18 * gauss(X, Y, px, py, 0.08, 0.10) * lung)
    if "Edema" in wanted:
        # Bilateral perihilar haze ("bat wings") plus short horizontal septal lines at the bases.
        haze = sum(gauss(X, Y, lx - np.sign(lx - cx) * 0.03, ly + 0.02, 0.09, 0.14)
                   for lx, ly, _, _ in lungs)
        lines = np.zeros_like(X)
        for lx, ly, rx, ry in lungs:
            edge = lx + np.sign(lx - cx) * rx * 0.7
            for t in range(3):
                lines += (gauss(X, Y, edge, ly + ry * (0.3 + 0.12 * t), 0.03, 0.004))
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
        gap = gauss(X, Y, px, py, 0.01, 0.035)
        img = img - 0.15 * gap + 0.25 * gauss(X, Y, px + 0.02, py + 0.012, 0.015, 0.012)
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
