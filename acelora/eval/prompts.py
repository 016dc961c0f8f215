"""Prompt templates and the class / finding names of each evaluation protocol (DESIGN §9)."""
from __future__ import annotations

from typing import Sequence

from acelora.data.ctrate import CT_RATE_FINDINGS

# Zero-shot classification: one class embedding = mean over these templates (DESIGN §9).
DEFAULT_TEMPLATES = ("a chest X-ray image of {c}.", "Findings suggesting {c}.")

# Histopathology (LC25000, MHIST): BiomedCLIP's own zero-shot prompt ("this is a photo of {c}")
# plus the two stain/modality phrasings pathology CLIPs (PLIP, QuiltNet) are evaluated with.
PATHOLOGY_TEMPLATES = ("this is a photo of {c}", "an H&E image of {c}.", "a histopathology image of {c}.")

# Multi-label: per finding one positive and one negative prompt (CT-CLIP style "present / not
# present"), each possibly an ensemble of several templates.
POSITIVE_TEMPLATES = ("Findings suggesting {c}.",)
NEGATIVE_TEMPLATES = ("No evidence of {c}.",)

# What the prompts say for each zero-shot set; the datasets' own label names may differ
# (e.g. a binary set's negative class).
CHEXPERT_5X200_CLASSNAMES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
RSNA_CLASSNAMES = ("No Finding", "pneumonia")
SIIM_CLASSNAMES = ("No Finding", "pneumothorax")

# NIH ChestX-ray14's findings, spelled as a report would say them (the CSV writes
# "Pleural_Thickening").
NIH_FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural Thickening",
    "Hernia",
)

# The 18 abnormalities of CT-RATE, as CT-CLIP and MedCT-VLM evaluate them (the label CSV's columns).
CT_FINDINGS = CT_RATE_FINDINGS

# Zero-shot class names by dataset class name (see :func:`default_classnames`).
DATASET_CLASSNAMES = {
    "CheXpert5x200Dataset": CHEXPERT_5X200_CLASSNAMES,
    "RSNAPneumoniaDataset": RSNA_CLASSNAMES,
    "SIIMPneumothoraxDataset": SIIM_CLASSNAMES,
}


# Zero-shot templates by dataset class name (see :func:`default_templates`).
DATASET_TEMPLATES = {"LC25000Dataset": PATHOLOGY_TEMPLATES, "MHISTDataset": PATHOLOGY_TEMPLATES}


def default_templates(dataset) -> tuple[str, ...]:
    """The prompt templates of ``dataset``'s protocol: pathology ones for the histopathology
    sets, else DESIGN §9's chest X-ray ones."""
    return DATASET_TEMPLATES.get(type(dataset).__name__, DEFAULT_TEMPLATES)


def check_templates(templates: Sequence[str], what: str = "templates") -> tuple[str, ...]:
    """Templates as a tuple; each must hold the ``{c}`` placeholder exactly where the name goes."""
    if isinstance(templates, str):
        templates = (templates,)
    templates = tuple(templates)
    if not templates:
        raise ValueError(f"{what}: need at least one prompt template")
    for t in templates:
        if not isinstance(t, str) or "{c}" not in t:
            raise ValueError(f"{what}: every template must contain '{{c}}' for the class name, got {t!r}")
    return templates


def fill(templates: Sequence[str], name: str) -> list[str]:
    """The prompts of one class: each template with ``{c}`` replaced by ``name``."""
    return [t.replace("{c}", name) for t in check_templates(templates)]


def multilabel_prompts(finding: str, positive: Sequence[str] = POSITIVE_TEMPLATES,
                       negative: Sequence[str] = NEGATIVE_TEMPLATES) -> tuple[list[str], list[str]]:
    """The positive and the negative prompts of one finding."""
    return fill(positive, finding), fill(negative, finding)


def finding_text(name: str) -> str:
    """A label name as prose: underscores become spaces ("Pleural_Thickening")."""
    return name.replace("_", " ").strip()


def default_classnames(dataset) -> list[str]:
    """The class names to prompt with for ``dataset``: the protocol's names for the known sets
    (DESIGN §9), else the dataset's own ``classes``."""
    known = DATASET_CLASSNAMES.get(type(dataset).__name__)
    classes = getattr(dataset, "classes", None)
    if known is not None and (classes is None or len(classes) == len(known)):
        return list(known)
    if not classes:
        raise ValueError(f"no class names: {type(dataset).__name__} has no `classes`; "
                         "pass classnames=[...] (or --classes on the command line)")
    return [finding_text(str(c)) for c in classes]
