"""The CheXpert label policy (DESIGN §6) and the finding lists of each data set."""
from __future__ import annotations

from dataclasses import dataclass

from acelora.config import CHEXPERT_FINDINGS

NIH_FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia",
)
CHEXPERT_5X200_CLASSES = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


@dataclass(frozen=True)
class LabelPolicy:
    """How CheXpert-labeler values become training targets.

    1 → ``positive``, 0 → ``negative``, −1 (uncertain) → ``uncertain``, blank (not mentioned) →
    ``blank``. The defaults map everything but 1 to 0; ``uncertain=1`` is the "U-Ones" policy.
    """

    positive: float = 1.0
    negative: float = 0.0
    uncertain: float = 0.0
    blank: float = 0.0

    @classmethod
    def from_config(cls, config) -> "LabelPolicy":
        """From an :class:`~acelora.config.ACELoRAConfig` (``uncertain_label``, ``blank_label``)."""
        return cls(uncertain=float(config.uncertain_label), blank=float(config.blank_label))

    def __call__(self, value: str) -> float:
        """Map one CSV cell ("1.0", "0", "-1.0", "") to its target; anything else: ValueError."""
        text = value.strip() if isinstance(value, str) else value
        if text == "" or text is None:
            return self.blank
        try:
            number = float(text)
        except (TypeError, ValueError):
            raise ValueError(f"not a CheXpert label value: {value!r} (expected 1, 0, -1 or blank)") from None
        if number != number:  # NaN, as pandas writes a blank
            return self.blank
        if number == 1:
            return self.positive
        if number == 0:
            return self.negative
        if number == -1:
            return self.uncertain
        raise ValueError(f"not a CheXpert label value: {value!r} (expected 1, 0, -1 or blank)")


__all__ = ["CHEXPERT_FINDINGS", "NIH_FINDINGS", "CHEXPERT_5X200_CLASSES", "LabelPolicy"]
