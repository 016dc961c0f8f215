"""Radiology report text: the FINDINGS and IMPRESSION sections of a free-text MIMIC-CXR report."""
from __future__ import annotations

import re

# A section heading is an upper-case phrase at the start of a line followed by a colon,
# e.g. " FINDINGS:", "IMPRESSION:", "FINDINGS AND IMPRESSION:".
_HEADING = re.compile(r"^[ \t]*([A-Z][A-Z0-9 ,&/()\-]*?)[ \t]*:", re.MULTILINE)
_SPACE = re.compile(r"\s+")

FINDINGS_HEADINGS = ("FINDINGS",)
IMPRESSION_HEADINGS = ("IMPRESSION", "FINDINGS AND IMPRESSION", "CONCLUSION", "IMPRESSIONS")


def clean_text(text: str) -> str:
    """Collapse runs of whitespace (reports are hard-wrapped) and strip."""
    return _SPACE.sub(" ", text or "").strip()


def split_sections(report: str) -> dict[str, str]:
    """Section heading (upper case) → its whitespace-normalised text. Text before the first
    heading is kept under ""; a repeated heading has its texts joined."""
    sections: dict[str, str] = {}
    matches = list(_HEADING.finditer(report))
    bounds = [(None, 0, matches[0].start() if matches else len(report))]
    for i, match in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(report)
        bounds.append((match.group(1).strip(), match.end(), end))
    for name, start, end in bounds:
        text = clean_text(report[start:end])
        key = name or ""
        if text or key not in sections:
            sections[key] = f"{sections[key]} {text}".strip() if sections.get(key) else text
    return sections


def findings_impression(report: str) -> tuple[str, str]:
    """(findings, impression) of a free-text report; "" where a section is absent."""
    sections = split_sections(report)
    findings = " ".join(sections[h] for h in FINDINGS_HEADINGS if sections.get(h))
    impression = " ".join(sections[h] for h in IMPRESSION_HEADINGS if sections.get(h))
    return findings, impression


def join_sections(findings: str, impression: str) -> str:
    """The training text: findings then impression, whitespace-normalised."""
    return clean_text(f"{clean_text(findings)} {clean_text(impression)}")
