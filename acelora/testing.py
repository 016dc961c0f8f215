"""Helpers for tests and benchmarks."""
from __future__ import annotations

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ computed in float64 (DESIGN §10)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def pad_token_rows(rows: list[list[int]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Token-id lists -> {"input_ids", "attention_mask"} padded to the longest row (toy tokenizers)."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def infonce_ddp_worker(rank: int, world_size: int, init_file: str, work_dir: str) -> None:
    """One rank of a CPU/gloo group for the distributed test of LabelGuidedInfoNCELoss.

    Reads ``work_dir/cases.pt`` (a list of cases: per-rank batch sizes, raw inputs, linear
    "encoder" weights, logit_scale, labels), runs each rank's slice through the encoders and the
    gathered loss, averages the parameter gradients over ranks as DistributedDataParallel does,
    and writes ``work_dir/rank<r>.pt`` with the loss and gradients of every case.
    """
    import os

    import torch.distributed as dist
    import torch.nn.functional as F

    from acelora.nn.loss import LabelGuidedInfoNCELoss

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        results = []
        for case in torch.load(os.path.join(work_dir, "cases.pt")):
            start = sum(case["sizes"][:rank])
            stop = start + case["sizes"][rank]
            w_image = case["w_image"].clone().requires_grad_()
            w_text = case["w_text"].clone().requires_grad_()
            scale = case["logit_scale"].clone().requires_grad_()
            image = F.normalize(case["x_image"][start:stop] @ w_image.T, dim=-1)
            text = F.normalize(case["x_text"][start:stop] @ w_text.T, dim=-1)
            labels = case["labels"][start:stop] if case["labels"] is not None else None
            loss = LabelGuidedInfoNCELoss(gather=True)(image, text, scale, labels)
            loss.backward()
            grads = [w_image.grad, w_text.grad, scale.grad]
            for g in grads:  # DDP: mean over ranks
                dist.all_reduce(g)
                g /= world_size
            results.append({"loss": loss.detach(), "grads": grads})
        torch.save(results, os.path.join(work_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# open_clip's native ViT-B-32 schema (QuiltNet's architecture) at toy size, for tests and demos.
TOY_OPEN_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 48, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
