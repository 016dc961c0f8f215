import copy

import pytest
import torch

import acelora
from acelora.models import ACELoRAModel

TEXTS = ["small left pleural effusion with adjacent atelectasis", "no pneumothorax is seen on the left side",
         "edema"]


@pytest.fixture(scope="session")
def tiny():
    """One random tiny base model shared by the model tests (they copy it before changing it)."""
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = acelora.create_model("tiny")
    torch.random.set_rng_state(state)
    return model


@pytest.fixture
def make_ace(tiny):
    """ACE-LoRA on a private copy of the shared tiny base."""
    def make(config="paper", **overrides):
        cfg = acelora.get_config(config, **overrides) if isinstance(config, str) else config
        return ACELoRAModel(copy.deepcopy(tiny.base), tiny.tokenizer, tiny.preprocess, cfg).eval()
    return make


def randomize_adapters(model):
    """Non-zero LoRA B and a moved logit scale, so the adapters change the outputs."""
    with torch.no_grad():
        for m in model.lora_modules():
            m.lora_B.normal_(0, 0.2)
        model.logit_scale.add_(0.3)


@pytest.fixture
def texts():
    return list(TEXTS)


@pytest.fixture
def randomize():
    return randomize_adapters
