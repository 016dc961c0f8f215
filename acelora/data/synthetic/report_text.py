"""Report text of the synthetic chest X-rays: a MIMIC-style free-text report naming each drawn
finding, and the CheXpert label vector of a set of findings."""
from __future__ import annotations

from typing import Iterable

import numpy as np

from acelora.config import CHEXPERT_FINDINGS
from acelora.data.synthetic.render import NO_FINDING, canonical_finding

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
    names = [n for n in dict.fromkeys(canonical_finding(f) for f in findings) if n != NO_FINDING]
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
        name = canonical_finding(f)
        if name in index:
            vec[index[name]] = 1.0
    if not vec.any():
        vec[index[NO_FINDING]] = 1.0
    return vec
