"""Synthetic H&E tiles and writers of the pathology layouts: LC25000, MHIST and a caption CSV.

Like the synthetic chest X-rays, the tiles are meant to be *learnable*, not realistic: each tissue
class has its own architecture (how many and how large the white lumens are, how many nuclei,
how large and how dark, whether the nuclei line the lumens, keratin pearls), drawn as stain
concentrations and turned into colour by Beer–Lambert absorption of a hematoxylin (purple) and an
eosin (pink) stain. So classes differ in colour statistics and texture, and a tiny model can
separate them. Everything is deterministic in ``seed``.
"""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from acelora.data.pathology import LC25000_FOLDER, LC25000_TASKS, MHIST_LABELS, MHIST_VOTES_COLUMN

# Optical densities of the two stains per RGB channel (Ruifrok & Johnston's H&E vectors).
HEMATOXYLIN_OD = np.array([0.650, 0.704, 0.286])
EOSIN_OD = np.array([0.072, 0.990, 0.105])


@dataclass(frozen=True)
class TissueStyle:
    """How one tissue class is drawn (lengths as fractions of the tile side)."""

    lumens: int            # white spaces: alveoli, gland or crypt lumens
    lumen_radius: float
    lumen_jitter: float    # 0 = round and even, larger = irregular
    nuclei: int
    nucleus_radius: float
    hematoxylin: float     # nuclear stain concentration
    eosin: float           # stroma / cytoplasm stain concentration
    rim: float             # fraction of nuclei lining the lumens (glands, crypts)
    pearls: int = 0        # keratin pearls (squamous cell carcinoma)


TISSUE_STYLES = {
    "lung_aca": TissueStyle(4, 0.08, 0.35, 110, 0.024, 1.25, 0.45, 0.7),
    "lung_n": TissueStyle(9, 0.12, 0.30, 35, 0.014, 0.85, 0.32, 0.2),
    "lung_scc": TissueStyle(0, 0.0, 0.0, 140, 0.030, 1.35, 0.80, 0.0, pearls=2),
    "colon_aca": TissueStyle(3, 0.05, 0.50, 190, 0.026, 1.55, 0.50, 0.5),
    "colon_n": TissueStyle(6, 0.065, 0.05, 80, 0.015, 1.00, 0.38, 0.9),
    "HP": TissueStyle(5, 0.07, 0.20, 85, 0.018, 1.05, 0.42, 0.8),
    "SSA": TissueStyle(3, 0.13, 0.15, 55, 0.017, 0.85, 0.28, 0.8),
}
# LC25000 file-name prefixes, as the release names its tiles (lungaca1.jpeg, colonn17.jpeg, ...).
LC25000_PREFIXES = {"lung_aca": "lungaca", "lung_n": "lungn", "lung_scc": "lungscc",
                    "colon_aca": "colonca", "colon_n": "colonn"}

# What a caption says about each class: (names, features).
_CAPTION_PARTS = {
    "lung_aca": (("lung adenocarcinoma", "adenocarcinoma of the lung"),
                 ("with malignant gland formation", "showing acinar glands lined by atypical cells")),
    "lung_n": (("benign lung", "normal lung parenchyma"),
               ("with thin alveolar septa", "showing open alveolar spaces")),
    "lung_scc": (("lung squamous cell carcinoma", "squamous cell carcinoma of the lung"),
                 ("with keratin pearls", "showing sheets of pink keratinizing cells")),
    "colon_aca": (("colon adenocarcinoma", "adenocarcinoma of the colon"),
                  ("with crowded irregular glands", "showing dark atypical nuclei and necrosis")),
    "colon_n": (("benign colonic tissue", "normal colonic mucosa"),
                ("with regular crypts", "showing evenly spaced crypts in the lamina propria")),
    "HP": (("hyperplastic polyp",), ("with serrated crypts", "showing straight narrow crypts")),
    "SSA": (("sessile serrated adenoma",), ("with dilated crypts", "showing broad boot-shaped crypt bases")),
}
_CAPTION_PREFIXES = ("H&E stained section of", "Histopathology image of", "Photomicrograph of",
                     "An H&E image of")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Band-limited noise in about [-1, 1]: a random cells×cells grid upsampled bicubically."""
    grid = rng.uniform(-1.0, 1.0, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid, mode="F").resize((size, size), Image.BICUBIC), np.float64)


def _disk(X, Y, cx, cy, rx, ry) -> np.ndarray:
    """A soft-edged ellipse in [0, 1] (one pixel of anti-aliasing)."""
    d = np.sqrt(((X - cx) / rx) ** 2 + ((Y - cy) / ry) ** 2)
    edge = 1.0 / (X.shape[0] * max(min(rx, ry), 1e-6))
    return np.clip((1.0 - d) / edge + 0.5, 0.0, 1.0)


def render_he(tissue: str, rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """An H&E-like RGB tile of ``tissue`` (a key of :data:`TISSUE_STYLES`): uint8 [size, size, 3]."""
    if tissue not in TISSUE_STYLES:
        raise ValueError(f"unknown tissue {tissue!r}; expected one of {sorted(TISSUE_STYLES)}")
    if int(size) < 16:
        raise ValueError(f"size must be >= 16 pixels, got {size}")
    style, size = TISSUE_STYLES[tissue], int(size)
    axis = (np.arange(size) + 0.5) / size
    Y, X = np.meshgrid(axis, axis, indexing="ij")
    stain = rng.uniform(0.9, 1.1, 2)  # per-slide staining strength (hematoxylin, eosin)
    eosin = style.eosin * stain[1] * (1.0 + 0.25 * _smooth_noise(rng, size, 6)
                                      + 0.1 * _smooth_noise(rng, size, 16))
    hema = np.zeros_like(X)

    lumen = np.zeros_like(X)
    centres = []
    for _ in range(style.lumens):
        cx, cy = rng.uniform(0.1, 0.9, 2)
        r = style.lumen_radius * rng.uniform(0.8, 1.2)
        rx, ry = r * (1 + style.lumen_jitter * rng.uniform(-1, 1)), r * (1 + style.lumen_jitter * rng.uniform(-1, 1))
        centres.append((cx, cy, rx, ry))
        lumen = np.maximum(lumen, _disk(X, Y, cx, cy, rx, ry))
    for _ in range(style.pearls):
        # Concentric whorls of dense keratin: rings of strong eosin.
        cx, cy = rng.uniform(0.2, 0.8, 2)
        d = np.sqrt((X - cx) ** 2 + (Y - cy) ** 2)
        eosin = eosin + 0.9 * np.exp(-d / 0.12) * (0.6 + 0.4 * np.cos(d * 2 * np.pi / 0.04))

    n_rim = int(round(style.nuclei * style.rim)) if centres else 0
    for k in range(style.nuclei):
        if k < n_rim:  # on a lumen's border, slightly outside it
            cx, cy, rx, ry = centres[int(rng.integers(len(centres)))]
            a = rng.uniform(0, 2 * np.pi)
            px, py = cx + 1.15 * rx * np.cos(a), cy + 1.15 * ry * np.sin(a)
        else:
            px, py = rng.uniform(0, 1, 2)
        r = style.nucleus_radius * rng.uniform(0.75, 1.3)
        elong = rng.uniform(0.8, 1.25)
        hema = np.maximum(hema, style.hematoxylin * stain[0] * rng.uniform(0.8, 1.2)
                          * _disk(X, Y, px, py, r * elong, r / elong))

    keep = 1.0 - lumen
    density = (hema[..., None] * HEMATOXYLIN_OD + eosin[..., None] * EOSIN_OD) * keep[..., None]
    rgb = 255.0 * np.exp(-density) * 0.97  # lumens: not quite white (slide background)
    rgb = rgb + rng.normal(0.0, 3.0, rgb.shape)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def caption_for(tissue: str, rng: np.random.Generator) -> str:
    """A short caption naming ``tissue`` and one of its drawn features, phrased variably."""
    names, features = _CAPTION_PARTS[tissue]
    return (f"{rng.choice(_CAPTION_PREFIXES)} {rng.choice(names)} "
            f"{rng.choice(features)}.")


def _write_csv(path: str, header, rows) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_lc25000(root: str, n_per_class: int = 4, seed: int = 0, image_size: int = 64,
                  tasks=("lung", "colon")) -> dict:
    """LC25000's layout under ``root``: ``lung_colon_image_set/{lung_image_sets,colon_image_sets}/
    <class>/<prefix><i>.jpeg`` (the release has 5,000 768×768 JPEGs per class; ``n_per_class``
    and ``image_size`` keep tests small).

    Returns ``dict(root, image_set, images={"<class folder>/<file>": class folder})``.
    """
    images = {}
    image_set = os.path.join(root, LC25000_FOLDER)
    for t, task in enumerate(tasks):
        task_folder, classes = LC25000_TASKS[task]
        for c, (folder, _) in enumerate(classes):
            class_dir = os.path.join(image_set, task_folder, folder)
            os.makedirs(class_dir, exist_ok=True)
            for i in range(1, int(n_per_class) + 1):
                name = f"{LC25000_PREFIXES[folder]}{i}.jpeg"
                tile = render_he(folder, np.random.default_rng([seed, 601, t, c, i]), image_size)
                Image.fromarray(tile, mode="RGB").save(os.path.join(class_dir, name), quality=92)
                images[f"{folder}/{name}"] = folder
    return {"root": root, "image_set": image_set, "images": images}


def _mhist_name(i: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return "MHIST_" + "".join(letters[(i // 26 ** k) % 26] for k in (2, 1, 0)) + ".png"


def write_mhist(root: str, n: int = 20, seed: int = 0, image_size: int = 64,
                p_ssa: float = 0.35, test_fraction: float = 0.3) -> dict:
    """MHIST's layout under ``root``: ``annotations.csv`` (its four columns, rows shuffled) and
    ``images/MHIST_<aaa>.png``. Each class has at least one train and one test image when it has
    two or more; SSA rows have 4–7 SSA votes, HP rows 0–3 (the majority vote).

    Returns ``dict(root, images={name: dict(label "HP"|"SSA", partition, votes, path)})``.
    """
    if int(n) < 2:
        raise ValueError(f"n must be >= 2, got {n}")
    rng = np.random.default_rng([seed, 701])
    n_ssa = min(int(n) - 1, max(1, int(round(n * p_ssa))))
    codes = ["SSA"] * n_ssa + ["HP"] * (int(n) - n_ssa)
    partitions = []
    for code in ("SSA", "HP"):
        count = codes.count(code)
        n_test = min(count - 1, max(1, int(round(count * test_fraction)))) if count > 1 else 0
        partitions += ["test"] * n_test + ["train"] * (count - n_test)
    images, rows = {}, []
    for i in rng.permutation(int(n)):
        i = int(i)
        name, code = _mhist_name(i), codes[i]
        votes = int(rng.integers(4, 8)) if code == "SSA" else int(rng.integers(0, 4))
        path = os.path.join(root, "images", name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tile = render_he(code, np.random.default_rng([seed, 703, i]), image_size)
        Image.fromarray(tile, mode="RGB").save(path)
        rows.append([name, code, votes, partitions[i]])
        images[name] = {"label": code, "partition": partitions[i], "votes": votes, "path": path}
    _write_csv(os.path.join(root, "annotations.csv"),
               ["Image Name", "Majority Vote Label", MHIST_VOTES_COLUMN, "Partition"], rows)
    return {"root": root, "images": images}


def write_caption_csv(root: str, n: int = 32, seed: int = 0, image_size: int = 64,
                      tissues=tuple(TISSUE_STYLES), image_column: str = "image",
                      caption_column: str = "caption", label_column: str | None = "label",
                      csv_name: str = "captions.csv") -> dict:
    """An image–caption CSV under ``root`` (``images/<i>.png``, paths relative to the CSV) with
    a caption per tile and, unless ``label_column`` is None, the tissue's class name.

    Returns ``dict(csv, rows=[dict(image, caption, tissue, label)])``.
    """
    rng = np.random.default_rng([seed, 801])
    header = [image_column, caption_column] + ([label_column] if label_column else [])
    out, rows = [], []
    for i in range(int(n)):
        tissue = str(tissues[int(rng.integers(len(tissues)))])
        rel = f"images/{i:05d}.png"
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tile = render_he(tissue, np.random.default_rng([seed, 803, i]), image_size)
        Image.fromarray(tile, mode="RGB").save(path)
        caption = caption_for(tissue, rng)
        label = _CAPTION_PARTS[tissue][0][0]
        rows.append([rel, caption] + ([label] if label_column else []))
        out.append({"image": rel, "caption": caption, "tissue": tissue, "label": label})
    csv_path = os.path.join(root, csv_name)
    _write_csv(csv_path, header, rows)
    return {"csv": csv_path, "rows": out}


__all__ = ["TISSUE_STYLES", "TissueStyle", "render_he", "caption_for", "write_lc25000",
           "write_mhist", "write_caption_csv", "MHIST_LABELS"]
