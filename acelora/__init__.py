"""acelora: ACE-LoRA (LoRA + ACE-HGNN + label-guided InfoNCE) for medical vision-language models."""
import importlib.util as _ilu
import os as _os
import sys as _sys

__version__ = "0.1.0"


def _expose_source_kernels() -> None:
    # Installed, kernels/ ships as acelora.kernels (package_dir). Run from a source checkout,
    # it sits beside acelora/: expose it under the same name.
    if "acelora.kernels" in _sys.modules:
        return
    if _ilu.find_spec("acelora.kernels") is not None:
        return
    src = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")
    init = _os.path.join(src, "__init__.py")
    if _os.path.exists(init):
        spec = _ilu.spec_from_file_location("acelora.kernels", init, submodule_search_locations=[src])
        module = _ilu.module_from_spec(spec)
        _sys.modules["acelora.kernels"] = module
        spec.loader.exec_module(module)
        globals()["kernels"] = module


_expose_source_kernels()

from acelora import ops  # noqa: E402,F401
from acelora.config import PRESETS, ACELoRAConfig, get_config  # noqa: E402,F401
from acelora.nn.loss import LabelGuidedInfoNCELoss  # noqa: E402,F401
from acelora.nn.hgnn import ACEHGNN  # noqa: E402,F401
from acelora.models import ACELoRAModel, create_ace_lora, create_base_model, create_model  # noqa: E402,F401
