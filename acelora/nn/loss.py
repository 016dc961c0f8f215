"""The training loss as an nn.Module, with the multi-GPU feature gather.

Gradient convention under torch.distributed (world size W, each rank holding its local batch):

* Every rank gathers the image/text features and labels of all ranks and returns the *same*
  full-batch loss L (the value one process would compute on the concatenated batch).
* Backward sends to the local features W · ∂L/∂x_local — what the summed gradient of a
  differentiable all_gather gives (open_clip's ``gather_with_grad=True``), computed here without a
  collective since every rank holds the identical L. ``logit_scale`` receives ∂L/∂s on every rank.
* DistributedDataParallel *averages* parameter gradients over ranks, so after its all-reduce every
  parameter (encoders and logit_scale alike) holds exactly the gradient that one process would get
  from the full batch: 2 ranks × B/2 train like 1 process × B.

Local batches may differ in size across ranks (the last batch of an epoch); they are padded for the
collective and trimmed afterwards.

Unlike open_clip's ``local_loss=True`` (each rank: its own rows against all columns, then the mean
of the ranks' means), every rank evaluates the whole global loss. That costs W× the loss FLOPs (the
fused kernel never stores the B×B logits, so not W× the memory) and gives exactly the one-process
gradient even for ragged batches, where a mean of local means would re-weight the samples.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from acelora.ops.infonce import label_guided_infonce


def _distributed_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _batch_sizes(n_local: int, device: torch.device) -> list[int]:
    """Every rank's local batch size (one small collective and one host read per step)."""
    n = torch.tensor([n_local], device=device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    return torch.cat(sizes).tolist()


def _all_gather_rows(local: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate every rank's [sizes[r], ...] tensor along dim 0 (no autograd)."""
    n_max = max(sizes)
    send = local.detach()
    if send.dtype == torch.bool:  # not every backend reduces/gathers bool
        send = send.to(torch.uint8)
    if send.shape[0] < n_max:
        send = torch.cat([send, send.new_zeros((n_max - send.shape[0],) + tuple(send.shape[1:]))])
    buffers = [torch.empty_like(send) for _ in sizes]
    dist.all_gather(buffers, send.contiguous())
    return torch.cat([buf[:n] for buf, n in zip(buffers, sizes)]).to(local.dtype)


class _GatherFeatures(torch.autograd.Function):
    """All-gather along the batch; backward returns W × the gradient of the local slot."""

    @staticmethod
    def forward(ctx, local, sizes):
        rank, world = _distributed_world()
        start = sum(sizes[:rank])
        ctx.slot = (start, start + sizes[rank])
        ctx.world = world
        return _all_gather_rows(local, sizes)

    @staticmethod
    def backward(ctx, grad_gathered):
        start, stop = ctx.slot
        return grad_gathered[start:stop] * ctx.world, None


def gather_features(image_emb: torch.Tensor, text_emb: torch.Tensor,
                    labels: torch.Tensor | None = None):
    """Full-batch (image_emb, text_emb, labels) from all ranks, in rank order, with the gradient
    convention of the module docstring. Identity when torch.distributed is not running."""
    _, world = _distributed_world()
    if world == 1:
        return image_emb, text_emb, labels
    sizes = _batch_sizes(image_emb.shape[0], image_emb.device)  # shared by the three gathers
    if labels is not None:
        labels = _all_gather_rows(labels, sizes)
    return (_GatherFeatures.apply(image_emb, sizes), _GatherFeatures.apply(text_emb, sizes), labels)


class LabelGuidedInfoNCELoss(nn.Module):
    """Label-guided InfoNCE (acelora.ops.label_guided_infonce) over the global batch.

    Args:
        gather: under torch.distributed with more than one rank, compute the loss on the features
            and labels of all ranks (see the module docstring for the gradient convention);
            otherwise on the local batch only.
        backend: "auto" | "reference" | "triton", passed to the op.
    """

    def __init__(self, gather: bool = True, backend: str = "auto"):
        super().__init__()
        self.gather = gather
        self.backend = backend
        # Batches whose label vectors were all identical: label-guided masking then removes every
        # negative (loss 0, no gradient). Counted on the device without a host sync; a trainer
        # reads it once per epoch (identical_label_batches) and warns.
        self.register_buffer("identical_labels_count", torch.zeros((), dtype=torch.long),
                             persistent=False)

    def identical_label_batches(self, reset: bool = True) -> int:
        """How many batches so far had identical labels for every pair (one host read)."""
        count = int(self.identical_labels_count.item())
        if reset:
            self.identical_labels_count.zero_()
        return count

    def _count_identical_labels(self, labels: torch.Tensor) -> None:
        if labels.shape[0] < 2:
            return
        same = (labels == labels[:1]).all()
        if self.identical_labels_count.device != same.device:
            self.identical_labels_count = self.identical_labels_count.to(same.device)
        self.identical_labels_count.add_(same.to(torch.long))

    def forward(self, image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        if self.gather:
            if image_emb.shape[0] != text_emb.shape[0]:  # checked before any collective
                raise ValueError(f"batch sizes differ: image_emb has {image_emb.shape[0]} rows, "
                                 f"text_emb {text_emb.shape[0]}")
            if labels is not None and labels.shape[0] != image_emb.shape[0]:
                raise ValueError(f"labels have {labels.shape[0]} rows but the batch has "
                                 f"{image_emb.shape[0]}")
            image_emb, text_emb, labels = gather_features(image_emb, text_emb, labels)
        if labels is not None:
            self._count_identical_labels(labels)
        return label_guided_infonce(image_emb, text_emb, logit_scale, labels, backend=self.backend)

    def extra_repr(self) -> str:
        return f"gather={self.gather}, backend={self.backend!r}"
