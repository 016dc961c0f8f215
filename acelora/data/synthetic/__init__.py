"""Synthetic chest X-rays: rendered images whose findings are visible, matching reports, and
writers that lay them out in each data set's official format (DESIGN §8).

Nothing here is meant to look real; it is meant to be *learnable*: every finding changes the
image in its own place and way (a wider heart, a bright blunted base, a dark rim without lung
markings, ...), so a model trained on the pairs can pick findings up, and zero-shot
classification over the finding names is meaningful. ``domain`` changes the acquisition
(contrast, gamma, noise, grid texture, blur) but not the anatomy, so a model adapted to one
domain sees a shift on another.

Everything is deterministic: the same ``rng`` state (or ``seed``) gives the same image.

Modules: :mod:`.render` (images and acquisition domains), :mod:`.report_text` (reports and label
vectors), :mod:`.pairs` (the in-memory ``SyntheticCXRPairs``), :mod:`.writers` (official layouts).
"""
from acelora.data.synthetic.pairs import SyntheticCXRPairs
from acelora.data.synthetic.render import (DOMAINS, FIVE_CLASSES, NO_FINDING, RENDERABLE, Domain,
                                           get_domain, render_array, render_cxr)
from acelora.data.synthetic.report_text import labels_vector, report_for
from acelora.data.synthetic.writers import (write_chexpert5x200, write_dicom, write_mimic, write_nih,
                                            write_rsna, write_siim)

__all__ = ["FIVE_CLASSES", "NO_FINDING", "RENDERABLE", "DOMAINS", "Domain", "get_domain",
           "render_array", "render_cxr", "report_for", "labels_vector", "SyntheticCXRPairs",
           "write_dicom", "write_mimic", "write_nih", "write_chexpert5x200", "write_rsna", "write_siim"]
