"""Models and datasets for evaluation, by the names the command line uses."""
from __future__ import annotations

import os
import tempfile

from acelora.weight_files import check_model_files, check_weight_file  # noqa: F401

ZEROSHOT_DATASETS = ("chexpert5x200", "rsna", "siim", "csv", "folder", "lc25000-lung",
                     "lc25000-colon", "mhist")
# The split each zero-shot set is evaluated on unless told (LC25000 has no official split).
ZEROSHOT_DEFAULT_SPLIT = {"lc25000-lung": "all", "lc25000-colon": "all"}
MULTILABEL_DATASETS = ("nih", "csv")


def load_model(model: str = "tiny", adapters: str | None = None, official: str | None = None,
               config=None, device=None, random_weights: bool | None = None):
    """The model to evaluate: the base model (``model`` only), the ACE-LoRA model with saved
    ``adapters`` (a folder written by ``save_adapters``), or with the released checkpoint
    ``official`` (``ACE_LoRA.pt``, imported into adapters with the ``official`` preset).

    ``model``: ``"tiny"``, ``"biomedclip"`` or a local model folder. ``config``: a preset name or
    an :class:`~acelora.config.ACELoRAConfig` (adapters: default what the folder says).

    ``random_weights``: a built-in architecture has no weights; the command line refuses it
    unless asked (True) and passes False; None (the Python API) warns once per process.
    """
    import acelora
    from acelora.provenance import check_random_weights

    check_random_weights(model, None, random_weights)
    check_model_files(model, adapters=adapters, official=official)
    if adapters and official:
        raise ValueError("give either adapters (a folder of saved adapters) or official (the "
                         "released ACE_LoRA.pt), not both")
    if official:
        if not os.path.isfile(official):
            raise FileNotFoundError(f"official checkpoint not found: {official!r}")
        from acelora.models.official import import_official_checkpoint

        with tempfile.TemporaryDirectory(prefix="acelora-official-") as tmp:
            import_official_checkpoint(official, tmp, base=model)
            return acelora.create_ace_lora(model, config=config, adapters=tmp, device=device)
    if adapters:
        if not os.path.isdir(adapters):
            raise FileNotFoundError(f"adapter folder not found: {adapters!r}")
        kwargs = {} if config is None else {"config": config}
        return acelora.create_ace_lora(model, adapters=adapters, device=device, **kwargs)
    if config is not None:  # a config without adapters: a fresh ACE-LoRA model (equals the base)
        return acelora.create_ace_lora(model, config=config, device=device)
    return acelora.create_model(model, device=device)


def dataset_transform(model):
    """The model's own evaluation preprocessing (``model.image_transform()``: its size, mean and
    std), with the geometry for boxes and masks (``map_boxes`` / ``map_mask``)."""
    if hasattr(model, "image_transform"):
        return model.image_transform()
    from acelora.data.transforms import biomedclip_transform

    return biomedclip_transform(int(model.image_size))


def _evaluation_mode(dataset):
    """Missing files were already left out while indexing (``on_error="skip"``); an image that
    fails to decode later must raise so the evaluation counts it, instead of the dataset's skip
    mode quietly serving the next image twice."""
    if getattr(dataset, "on_error", None) == "skip":
        dataset.on_error = "raise"
    return dataset


def build_zeroshot_dataset(kind: str, root: str, transform, split: str | None = "test",
                           image_col: str = "path", label_col: str = "label",
                           classes: list[str] | None = None, on_error: str = "skip"):
    """A single-label dataset of ``kind`` (one of :data:`ZEROSHOT_DATASETS`) under ``root``.

    ``chexpert5x200``: the CSV or its folder; ``rsna`` / ``siim``: the official layout, ``split``
    of the deterministic train/valid/test assignment (``all`` = every image); ``csv``: a CSV with
    ``image_col`` and ``label_col``; ``folder``: ``root/<class>/<image>``; ``lc25000-lung`` /
    ``lc25000-colon``: LC25000's lung (3-way) or colon (2-way) task, ``split`` all | train | test
    of its deterministic hold-out; ``mhist``: MHIST's ``Partition`` (test | train | all).
    """
    from acelora.data.classification import (CheXpert5x200Dataset, CSVClassification,
                                             ImageFolderClassification)
    from acelora.data.rsna import RSNAPneumoniaDataset
    from acelora.data.siim import SIIMPneumothoraxDataset

    split = None if split in (None, "all") else split
    if kind == "chexpert5x200":
        ds = CheXpert5x200Dataset(root, transform=transform, on_error=on_error)
    elif kind == "rsna":
        ds = RSNAPneumoniaDataset(root, split=split, transform=transform, on_error=on_error)
    elif kind == "siim":
        ds = SIIMPneumothoraxDataset(root, split=split, transform=transform, on_error=on_error)
    elif kind == "csv":
        ds = CSVClassification(root, image_col=image_col, label_col=label_col, transform=transform,
                               classes=classes, on_error=on_error)
    elif kind == "folder":
        ds = ImageFolderClassification(root, transform=transform, on_error=on_error)
    elif kind in ("lc25000-lung", "lc25000-colon"):
        from acelora.data.pathology import LC25000Dataset
        ds = LC25000Dataset(root, task=kind.split("-")[1], split=split, transform=transform,
                            on_error=on_error)
    elif kind == "mhist":
        from acelora.data.pathology import MHISTDataset
        ds = MHISTDataset(root, split=split, transform=transform, on_error=on_error)
    else:
        raise ValueError(f"unknown zero-shot dataset {kind!r}; choose from {ZEROSHOT_DATASETS}")
    return _evaluation_mode(ds)


def build_multilabel_dataset(kind: str, root: str, transform, split: str | None = "test",
                             image_col: str = "path", findings: list[str] | None = None,
                             on_error: str = "skip"):
    """A multi-hot dataset: ``nih`` (ChestX-ray14 layout; split ``test``/``train_val``/``all``)
    or ``csv`` (image column + one 1/0/−1/blank column per finding)."""
    from acelora.data.classification import NIHChestXray14Dataset
    from acelora.eval.multilabel import MultiLabelCSVDataset

    if kind == "nih":
        ds = NIHChestXray14Dataset(root, split=None if split in (None, "all") else split,
                                   transform=transform, on_error=on_error)
    elif kind == "csv":
        ds = MultiLabelCSVDataset(root, findings=findings, image_col=image_col, transform=transform,
                                  on_error=on_error)
    else:
        raise ValueError(f"unknown multi-label dataset {kind!r}; choose from {MULTILABEL_DATASETS}")
    return _evaluation_mode(ds)
