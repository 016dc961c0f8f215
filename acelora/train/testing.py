"""Small stand-ins for tests of the training loop: a toy CLIP with the model interface the loop
uses, a toy image–text data set, and the per-rank worker of the 2-process gloo test."""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from acelora.config import CHEXPERT_FINDINGS
from acelora.testing import pad_token_rows

TOY_WORDS = ("normal", "effusion", "edema", "heart", "enlarged", "opacity", "left", "right",
             "lung", "base", "clear", "no", "acute", "process", "there", "is", "a")


class ToyTokenizer:
    """Whitespace tokenizer over :data:`TOY_WORDS`: id 0 pad, 1 CLS, 2 unknown; pads to the
    batch's longest text."""

    def __init__(self, context_length: int = 16):
        self.context_length = context_length
        self.vocab = {w: i + 3 for i, w in enumerate(TOY_WORDS)}

    def __call__(self, texts, context_length=None):
        limit = int(context_length or self.context_length)
        rows = [[1] + [self.vocab.get(w, 2) for w in t.lower().replace(".", "").split()] for t in texts]
        return pad_token_rows([r[:limit] for r in rows])


class ToyCLIP(nn.Module):
    """Two small towers with dropout, a learned log logit scale, and a frozen part (so "trainable
    parameters only" is meaningful)."""

    def __init__(self, image_size: int = 8, dim: int = 16, hidden: int = 32, dropout: float = 0.0,
                 vocab: int = len(TOY_WORDS) + 3):
        super().__init__()
        self.image_size = image_size
        self.frozen = nn.Linear(3 * image_size * image_size, hidden)
        self.frozen.requires_grad_(False)
        self.image_head = nn.Sequential(nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.embed = nn.Embedding(vocab, hidden)
        self.text_head = nn.Sequential(nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        self.tokenizer = ToyTokenizer()

    def encode_image(self, images, normalize=True):
        x = self.image_head(self.frozen(images.flatten(1)))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, input_ids, attention_mask=None, normalize=True):
        if attention_mask is None:
            attention_mask = (input_ids != 0).long()
        m = attention_mask.unsqueeze(-1).to(self.embed.weight.dtype)
        pooled = (self.embed(input_ids) * m).sum(1) / m.sum(1).clamp_min(1)
        x = self.text_head(pooled)
        return F.normalize(x, dim=-1) if normalize else x


class ToyPairs(torch.utils.data.Dataset):
    """``n`` image–text items (``image``, ``text``, ``labels`` [14], ``label``, ``id``) from a
    few classes, so label-guided masking has equal label vectors to mask."""

    classes = ["normal", "effusion", "edema", "heart enlarged"]

    def __init__(self, n: int = 64, image_size: int = 8, seed: int = 0, nan_at: int | None = None):
        g = torch.Generator().manual_seed(seed)
        self.label = torch.randint(0, len(self.classes), (n,), generator=g)
        centers = torch.randn(len(self.classes), 3, image_size, image_size, generator=g)
        self.images = centers[self.label] + 0.5 * torch.randn(n, 3, image_size, image_size, generator=g)
        if nan_at is not None:
            self.images[nan_at] = float("nan")
        self.texts = [f"there is {self.classes[c]} {'left' if i % 2 else 'right'} lung"
                      for i, c in enumerate(self.label.tolist())]
        self.labels = torch.zeros(n, len(CHEXPERT_FINDINGS))
        self.labels[torch.arange(n), self.label] = 1.0

    def __len__(self):
        return len(self.texts)

    def __getitem__(self, i):
        return {"image": self.images[i].clone(), "text": self.texts[i], "labels": self.labels[i].clone(),
                "label": int(self.label[i]), "id": f"toy-{i}"}


def ddp_grad_worker(rank: int, world_size: int, init_file: str, work_dir: str) -> None:
    """One rank of the CPU/gloo test: for each case in ``work_dir/cases.pt`` (model state, data
    seed, batch size, grad_accum), the Trainer's backward on this rank's share of the batch; writes
    the trainable gradients (after DDP's all-reduce) and the loss to ``work_dir/rank<r>.pt``."""
    import torch.distributed as dist

    from acelora.config import get_config
    from acelora.train.distributed import DistInfo
    from acelora.data.collate import ImageTextCollator
    from acelora.train.loop import Trainer
    from acelora.train.settings import TrainConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        results = []
        for case in torch.load(os.path.join(work_dir, "cases.pt"), weights_only=True):
            model = ToyCLIP(dropout=0.0)
            model.load_state_dict(case["state"])
            data = ToyPairs(case["n"], seed=case["seed"])
            cfg = TrainConfig(output_dir=os.path.join(work_dir, f"out{rank}"), progress=False,
                              tensorboard=False, batch_size=case["n"], grad_accum=case["grad_accum"],
                              lr=1e-3, warmup_steps=0, epochs=1, method=get_config("paper"))
            trainer = Trainer(model, data, cfg,
                              dist_info=DistInfo(rank, world_size, rank, torch.device("cpu")))
            # This rank's share of the global batch: positions rank, rank + W, ... (the sampler's deal).
            items = [data[i] for i in range(rank, case["n"], world_size)]
            loss = trainer.backward(ImageTextCollator(model.tokenizer)(items))
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
            results.append({"loss": loss, "grads": grads})
        torch.save(results, os.path.join(work_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
