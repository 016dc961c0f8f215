"""One optimizer step of the Trainer: the forward through ``ContrastiveTask``, exact gradient
accumulation over micro-batches, gradient clipping and the NaN policy.

With ``grad_accum = k`` each rank splits its share into k micro-batches and accumulates *exactly*
the gradient of the full-batch loss (a contrastive loss is not a sum over micro-batches, so plain
gradient accumulation would change the negatives): the embeddings of every micro-batch are
computed without a graph first, the loss and its gradient w.r.t. the embeddings are taken on the
whole batch, then each micro-batch is re-run with its original RNG state (same dropout masks) and
back-propagates its slice of that gradient.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os

import torch

from acelora.train.sampling import autocast_context, rng_restore, rng_snapshot

log = logging.getLogger("acelora.train")


class OptimizerStep:
    """The step half of :class:`acelora.train.loop.Trainer` (which sets ``model``, ``task``,
    ``forward_module``, ``optimizer``, ``scheduler``, ``params``, ``cfg``, ``dist``, ``device``
    and the step counters)."""

    def _forward(self, mb: dict):
        with autocast_context(self.device, self.cfg.precision):
            image, text, scale = self.forward_module(mb["images"], mb["input_ids"], mb["attention_mask"])
        return image.float(), text.float(), scale.float()

    def _split(self, batch: dict) -> list[dict]:
        k = self.cfg.grad_accum
        n = batch["images"].shape[0]
        if n % k:
            raise ValueError(f"a batch of {n} cannot be split into {k} micro-batches")
        size = n // k
        chunks = []
        for i in range(k):
            mb = {key: (v[i * size:(i + 1) * size] if torch.is_tensor(v) else v) for key, v in batch.items()}
            tower = getattr(self.model, "text_tower", None)
            if k > 1 and tower is not None:
                # The text tower's padding rule: in the paper preset a micro-batch is trimmed to
                # its longest text, as if it had been collated alone.
                mb["input_ids"], mb["attention_mask"] = tower.fit(
                    mb["input_ids"], mb["attention_mask"], trim=True)
            chunks.append(mb)
        return chunks

    def _to_device(self, batch: dict) -> dict:
        return {k: (v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v)
                for k, v in batch.items()}

    def _accumulated_backward(self, chunks: list[dict]) -> torch.Tensor:
        """Full-batch loss; gradients of the full-batch loss accumulated chunk by chunk."""
        labels = torch.cat([c["labels"] for c in chunks]) if "labels" in chunks[0] else None
        snapshots, images, texts, scales = [], [], [], []
        with torch.no_grad():
            for mb in chunks:
                snapshots.append(rng_snapshot(self.device))
                image, text, scale = self._forward(mb)
                images.append(image)
                texts.append(text)
                scales.append(scale)
        after = rng_snapshot(self.device)
        image_all = torch.cat(images).requires_grad_()
        text_all = torch.cat(texts).requires_grad_()
        scale_leaf = scales[0].detach().requires_grad_()
        loss = self.task.loss(image_all, text_all, scale_leaf, labels)
        if not torch.isfinite(loss):
            return loss.detach()
        loss.backward()
        sizes = [c["images"].shape[0] for c in chunks]
        g_image, g_text = image_all.grad.split(sizes), text_all.grad.split(sizes)
        g_scale = scale_leaf.grad / len(chunks)
        ddp = self.dist.distributed
        for i, mb in enumerate(chunks):
            sync = (not ddp) or i == len(chunks) - 1
            ctx = contextlib.nullcontext() if sync else self.forward_module.no_sync()
            rng_restore(snapshots[i], self.device)
            with ctx:
                image, text, scale = self._forward(mb)
                surrogate = (image * g_image[i]).sum() + (text * g_text[i]).sum() + scale * g_scale
                surrogate.backward()
        rng_restore(after, self.device)
        return loss.detach()

    def backward(self, batch: dict) -> torch.Tensor:
        """Zero the gradients, then leave in ``.grad`` the gradient of the full-batch loss on
        this rank's share ``batch`` (all-reduced over ranks by DDP). Returns the detached loss.
        A non-finite loss still runs its backward (its gradients are then non-finite too):
        testing it here would be a device->host sync before every backward; ``train_step``
        reads the loss and the gradient norm in one sync and drops such a step. (With gradient
        accumulation a non-finite loss is returned without the second pass.)"""
        batch = self._to_device(batch)
        self.optimizer.zero_grad(set_to_none=True)
        chunks = self._split(batch)
        if len(chunks) > 1:
            return self._accumulated_backward(chunks)
        image, text, scale = self._forward(chunks[0])
        loss = self.task.loss(image, text, scale, chunks[0].get("labels"))
        loss.backward()
        return loss.detach()

    def train_step(self, batch: dict) -> dict[str, float]:
        """One optimizer step on this rank's share of a global batch."""
        loss = self.backward(batch)
        lr = self.optimizer.param_groups[0]["lr"]
        max_norm = self.cfg.clip_grad_norm if self.cfg.clip_grad_norm else float("inf")
        # Clipping non-finite gradients is harmless: a non-finite step's gradients are dropped.
        norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        # One device->host read for the NaN policy and the log (was one each for isfinite(loss),
        # the loss and the norm).
        loss_value, grad_norm = torch.stack([loss.float(), norm.float().to(loss.device)]).tolist()
        if not math.isfinite(loss_value):
            self._non_finite("loss", loss_value)
            return {"loss": loss_value, "lr": lr, "skipped": 1.0}
        if not math.isfinite(grad_norm):
            self._non_finite("gradient norm", grad_norm)
            return {"loss": loss_value, "lr": lr, "skipped": 1.0}
        self.optimizer.step()
        self.scheduler.step()
        if hasattr(self.model, "clamp_logit_scale"):  # open_clip keeps the multiplier <= 100
            self.model.clamp_logit_scale()
        scale = float(self.model.logit_scale.detach().exp())
        return {"loss": loss_value, "lr": lr, "grad_norm": grad_norm, "logit_scale": scale,
                "skipped": 0.0}

    def _non_finite(self, what: str, value: float) -> None:
        """A NaN/Inf step: raise, or drop its gradients and count it (the schedule moves on)."""
        where = f"epoch {self.epoch + 1}, step {self.step + 1}"
        if self.cfg.nan_policy == "error":
            raise FloatingPointError(
                f"non-finite {what} ({value}) at {where}. Lower lr, use precision 'fp32', set "
                "clip_grad_norm, or set nan_policy: skip to skip such steps.")
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.skipped_steps += 1
        self._epoch_skipped += 1
        log.warning("non-finite %s (%s) at %s: step skipped (%d so far)", what, value, where,
                    self.skipped_steps)
        if self.skipped_steps > self.cfg.max_nan_skips:
            raise FloatingPointError(
                f"training diverged: {self.skipped_steps} steps had a non-finite loss or gradient "
                f"(more than max_nan_skips={self.cfg.max_nan_skips}), the last at {where}. "
                f"{self._last_good()} Lower lr (now {self.cfg.lr}), set clip_grad_norm or use "
                "precision fp32, then --resume auto --allow-config-change.")

    def _last_good(self) -> str:
        if os.path.exists(self.checkpoint_path):
            return f"The last checkpoint, {self.checkpoint_path}, predates the divergence."
        return "No checkpoint was written."

    # --- state ----------------------------------------------------------------------------
