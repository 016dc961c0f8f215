"""The contrastive training loop: ``Trainer`` runs epochs of optimizer steps (``acelora.train.step``:
exact gradient accumulation, NaN policy) over an ``EpochSampler``, validates, saves checkpoints,
adapters and ``best/``, and resumes exactly. One optimizer step sees ``batch_size`` image–text pairs
over all ranks.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from acelora.data.collate import ImageTextCollator
from acelora.eval.zeroshot import zero_shot_evaluate
from acelora.models.task import ContrastiveTask
from acelora.nn.loss import LabelGuidedInfoNCELoss
from acelora.train.checkpoint import atomic_directory, load_checkpoint, save_checkpoint
from acelora.train.distributed import DistInfo, all_ranks_ok, all_reduce_mean, barrier, broadcast_flag
from acelora.train.logger import MetricLogger
from acelora.train.run_folder import claim_run_folder, write_run_record
from acelora.train.optim import build_optimizer, build_scheduler, trainable_named_parameters
from acelora.train.sampling import EpochSampler, seed_everything  # noqa: F401  (re-exported)
from acelora.train.settings import TrainConfig
from acelora.train.step import OptimizerStep

log = logging.getLogger("acelora.train")



# --- zero-shot validation ---------------------------------------------------------------------

def zero_shot_accuracy(model: nn.Module, dataset, classnames: Sequence[str] | None = None,
                       templates: Sequence[str] | None = None, batch_size: int = 64,
                       device: torch.device | None = None) -> dict[str, float]:
    """Validation: the numeric metrics of ``acelora eval zeroshot``'s evaluator
    (:func:`acelora.eval.zeroshot.zero_shot_evaluate`: accuracy, balanced accuracy, macro-F1,
    AUROC) on ``dataset`` (items with ``image`` and an int ``label``).

    LoRA is not merged (the weights stay bit-for-bit untouched, which exact resume relies on);
    non-finite embeddings raise instead of being scored; unreadable images are skipped and
    counted.
    """
    out = zero_shot_evaluate(model, dataset, classnames, templates, batch_size=batch_size,
                             device=device, merge=False)
    return {k: float(v) for k, v in out.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("n", "skipped")}


# --- the trainer ------------------------------------------------------------------------------

def _save_weights(model: nn.Module, directory: str) -> None:
    """Adapters (``model.save_adapters``) or, for models without adapters, the trainable
    parameters as safetensors."""
    if hasattr(model, "save_adapters"):
        model.save_adapters(directory)
        return
    from safetensors.torch import save_file
    state = {n: p.detach().cpu().contiguous() for n, p in trainable_named_parameters(model)}
    save_file(state, os.path.join(directory, "trainable.safetensors"))


class Trainer(OptimizerStep):
    """Contrastive training of ``model`` (anything with ``encode_image``, ``encode_text``,
    ``logit_scale`` and ``tokenizer``; the trainable parameters are those with
    ``requires_grad``) on image–text ``train_dataset`` under ``cfg``.

    ``evaluate(model) -> dict[str, float]`` runs after each epoch on the main rank; the epoch
    with the highest ``cfg.val_metric`` has its weights saved under ``output_dir/best``.
    Outputs: ``checkpoints/last.pt`` (exact-resume state, written atomically each epoch),
    ``adapters/`` (final weights), ``best/``, ``logs/`` (CSV, TensorBoard, ``training.png``).
    """

    def __init__(self, model: nn.Module, train_dataset, cfg: TrainConfig,
                 evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
                 dist_info: DistInfo | None = None, collate_fn: Callable | None = None,
                 *, overwrite: bool = False, allow_config_change: bool = False,
                 provenance: dict[str, Any] | None = None):
        self.model = model
        self.cfg = cfg
        self.method = cfg.method
        self.dist = dist_info or DistInfo(device=next(model.parameters()).device)
        self.device = self.dist.device
        self.evaluate = evaluate
        self.output_dir = cfg.output_dir
        self.checkpoint_path = os.path.join(self.output_dir, "checkpoints", "last.pt")

        per_rank, rem = divmod(cfg.batch_size, self.dist.world_size)
        if rem:
            raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the world size "
                             f"{self.dist.world_size}")
        if per_rank % cfg.grad_accum:
            raise ValueError(f"each rank's batch ({per_rank} = batch_size / world size) is not "
                             f"divisible by grad_accum {cfg.grad_accum}")
        self.micro_batch = per_rank // cfg.grad_accum

        self.params = [p for _, p in trainable_named_parameters(model)]
        self.optimizer = build_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sampler = EpochSampler(len(train_dataset), cfg.batch_size, self.dist.world_size,
                                    self.dist.rank, seed=cfg.seed)
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.scheduler = build_scheduler(self.optimizer, cfg.warmup_steps, self.total_steps)
        self.train_dataset = train_dataset
        self.collate_fn = collate_fn or ImageTextCollator(model.tokenizer)
        # The one definition of the step's computation; features gathered across ranks.
        self.task = ContrastiveTask(model, LabelGuidedInfoNCELoss(gather=True, backend=cfg.backend),
                                    label_guided=self.method.label_guided)
        self.loss_fn = self.task.loss_fn
        if cfg.grad_checkpointing:
            if not hasattr(model, "set_grad_checkpointing"):
                raise ValueError(f"grad_checkpointing: {type(model).__name__} has no "
                                 "set_grad_checkpointing() switch")
            model.set_grad_checkpointing(True)   # open_clip's switch; the towers honour it
        self.forward_module = self.task
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_module = DDP(self.forward_module, device_ids=ids,
                                      find_unused_parameters=cfg.find_unused_parameters)
        self.step = 0
        self.epoch = 0
        self.batches_done = 0          # optimizer steps done within the current epoch
        self.skipped_steps = 0
        self.best_metric: float | None = None
        self.best_epoch: int | None = None
        self.history: list[dict[str, Any]] = []
        self._epoch_loss_sum = 0.0
        self._epoch_loss_count = 0
        self._epoch_skipped = 0        # skipped (non-finite) steps of the current epoch
        self.overwrite = overwrite                       # replace an earlier run in output_dir
        self.allow_config_change = allow_config_change   # resume with changed settings
        self.provenance = provenance                     # recorded in config.json
        self._warned_identical_labels = False
        self._last_save = time.monotonic()
        # Opened by fit() once the run folder is claimed (nothing is written before that).
        self.logger = MetricLogger(os.path.join(self.output_dir, "logs"), enabled=False)

    def _state_extra(self) -> dict:
        return {"batches_done": self.batches_done, "skipped_steps": self.skipped_steps,
                "best_metric": self.best_metric, "best_epoch": self.best_epoch,
                "epoch_loss_sum": self._epoch_loss_sum, "epoch_loss_count": self._epoch_loss_count,
                "epoch_skipped": self._epoch_skipped, "world_size": self.dist.world_size,
                "frozen_weights_sha256": self._frozen_hash(), "train_items": len(self.train_dataset)}

    def save_checkpoint(self, path: str | None = None) -> str | None:
        path = path or self.checkpoint_path
        if self.dist.is_main:
            save_checkpoint(path, self.model, self.optimizer, self.scheduler, step=self.step,
                            epoch=self.epoch, config=self.cfg.to_dict(), extra=self._state_extra())
        barrier()
        self._last_save = time.monotonic()
        return path

    def resume(self, path: str) -> dict[str, dict]:
        """Continue exactly where the checkpoint at ``path`` left off.

        Settings that change the result must match the checkpoint's (see
        :mod:`acelora.train.consistency`); with ``allow_config_change`` the new ones apply.
        Returns the applied changes ``{name: {"checkpoint": old, "now": new}}``."""
        from acelora.train import checkpoint as ckpt
        from acelora.train.consistency import apply_optimizer_settings, check_resume, resume_changes

        state = load_checkpoint(path, restore_rng=False)   # read and checked, nothing applied yet
        extra = state["extra"]
        changes = resume_changes(state["config"], extra, self.cfg.to_dict(), self._frozen_hash(),
                                 len(self.train_dataset))
        check_resume(path, changes, self.allow_config_change)
        ckpt.load_trainable_state_dict(self.model, state["model"])
        if state["optimizer"] is None:
            raise ValueError(f"checkpoint {path!r} holds no optimizer state")
        self.optimizer.load_state_dict(state["optimizer"])
        if state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if changes:
            apply_optimizer_settings(self.optimizer, self.scheduler, self.cfg.lr, self.cfg.weight_decay)
            log.warning("resuming %s with changed settings (--allow-config-change): %s", path,
                        "; ".join(f"{k} {v['checkpoint']!r} -> {v['now']!r}" for k, v in changes.items()))
        self.step, self.epoch = state["step"], state["epoch"]
        self.batches_done = min(int(extra.get("batches_done", 0)), self.steps_per_epoch)
        self.skipped_steps = int(extra.get("skipped_steps", 0))
        self.best_metric, self.best_epoch = extra.get("best_metric"), extra.get("best_epoch")
        self._epoch_loss_sum = float(extra.get("epoch_loss_sum", 0.0))
        self._epoch_loss_count = int(extra.get("epoch_loss_count", 0))
        self._epoch_skipped = int(extra.get("epoch_skipped", 0))
        # Same world size: every rank continues its own random stream; otherwise (or with a new
        # seed) re-seed.
        if extra.get("world_size", 1) == self.dist.world_size and self.dist.world_size == 1 \
                and "seed" not in changes:
            from acelora.train.checkpoint import set_rng_state
            set_rng_state(state["rng"])
        else:
            seed_everything(self.cfg.seed + 1000 * self.step + self.dist.rank)
        log.info("resumed from %s at epoch %d, step %d", path, self.epoch, self.step)
        return changes

    def _frozen_hash(self) -> str:
        """Hash of the frozen weights (computed once: they do not change)."""
        if getattr(self, "_frozen_sha256", None) is None:
            from acelora.train.consistency import frozen_weights_sha256
            self._frozen_sha256 = frozen_weights_sha256(self.model)
        return self._frozen_sha256

    # --- epochs ---------------------------------------------------------------------------
    def _loader(self) -> DataLoader:
        self.sampler.set_epoch(self.epoch, self.batches_done)
        g = torch.Generator().manual_seed(self.cfg.seed * 1009 + self.epoch)
        return DataLoader(self.train_dataset, batch_size=self.cfg.batch_size // self.dist.world_size,
                          sampler=self.sampler, collate_fn=self.collate_fn, drop_last=True,
                          num_workers=self.cfg.num_workers, generator=g,
                          pin_memory=self.device.type == "cuda",
                          persistent_workers=False)

    def _validate(self) -> dict[str, float]:
        if self.evaluate is None:
            return {}
        metrics: dict[str, float] = {}
        if self.dist.is_main:
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):  # validation never shifts training randomness
                try:
                    metrics = {k: float(v) for k, v in self.evaluate(self.model).items()}
                except FloatingPointError as exc:  # NaN embeddings: no score, not a best epoch
                    log.warning("epoch %d: validation impossible: %s", self.epoch, exc)
                    metrics = {self.cfg.val_metric: float("nan")}
        barrier()
        return metrics

    def _save_best(self, directory: str) -> None:
        if self.dist.is_main:
            atomic_directory(lambda d: _save_weights(self.model, d), directory)

    def fit(self) -> dict[str, Any]:
        """Train to ``cfg.epochs`` (or ``cfg.max_steps``); returns a summary dict.

        The main process first claims ``output_dir`` (a lock held until the end; an earlier run
        there is resumed, replaced with ``overwrite``, or refused)."""
        lock, error = None, None
        if self.dist.is_main:
            try:
                lock = claim_run_folder(self.output_dir, self.cfg.resume, self.overwrite)
            except BaseException as exc:  # every rank must learn of it, not wait forever
                error = exc
        if not all_ranks_ok(error is None, self.device):
            if error is not None:
                raise error
            raise RuntimeError("the main process could not claim the output folder")
        try:
            return self._fit()
        finally:
            self.logger.close()
            if lock is not None:
                lock.release()

    def _start(self) -> None:
        """Resume (or say that there is nothing to resume), open the logs, write config.json."""
        cfg = self.cfg
        resumed_from, changed = None, {}
        if cfg.resume:
            path = self.checkpoint_path if cfg.resume == "auto" else cfg.resume
            if cfg.resume != "auto" or os.path.exists(path):
                changed = self.resume(path) or {}
                resumed_from = path
            elif self.dist.is_main:
                log.info("--resume auto: no checkpoint at %s; starting a fresh run", path)
        self.logger = MetricLogger(os.path.join(self.output_dir, "logs"), tensorboard=cfg.tensorboard,
                                   enabled=self.dist.is_main)
        if resumed_from:
            self.logger.resume_at(self.step, self.epoch)
        if self.dist.is_main:
            event = ({"event": "resume", "from": os.path.abspath(resumed_from), "step": self.step,
                      "epoch": self.epoch, "changed": changed} if resumed_from else {"event": "start"})
            write_run_record(self.output_dir, cfg.to_dict(), self.provenance, event)

    def _fit(self) -> dict[str, Any]:
        cfg = self.cfg
        self._start()
        self.model.train()
        self._last_save = time.monotonic()
        stopped = False
        while self.epoch < cfg.epochs and not stopped:
            t0 = time.perf_counter()
            loader = self._loader()
            progress = None
            if cfg.progress and self.dist.is_main:
                from tqdm.auto import tqdm
                progress = tqdm(total=self.steps_per_epoch, initial=self.batches_done,
                                desc=f"epoch {self.epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True)
            for batch in loader:
                out = self.train_step(batch)
                self.step += 1
                self.batches_done += 1
                if out["skipped"] == 0.0:
                    self._epoch_loss_sum += out["loss"]
                    self._epoch_loss_count += 1
                if self.step % cfg.log_every == 0 or self.batches_done == self.steps_per_epoch:
                    self.logger.log_step(self.step, {k: v for k, v in out.items() if k != "skipped"})
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{out['loss']:.4f}", lr=f"{out['lr']:.2e}")
                if cfg.max_steps is not None and self.step >= cfg.max_steps:
                    stopped = True
                    break
                if self.batches_done < self.steps_per_epoch and self._periodic_save_due():
                    self._save_if_finite()
            if progress is not None:
                progress.close()
            if self.batches_done < self.steps_per_epoch:  # stopped inside an epoch
                self._check_finite(f"at step {self.step}")
                self.save_checkpoint()
                break
            self._end_epoch(t0)
        final = os.path.join(self.output_dir, "adapters")
        if self.dist.is_main:
            atomic_directory(lambda d: _save_weights(self.model, d), final)
        barrier()
        self.logger.plot()
        return {"steps": self.step, "epochs": self.epoch, "skipped_steps": self.skipped_steps,
                "best_metric": self.best_metric, "best_epoch": self.best_epoch,
                "history": self.history, "output_dir": self.output_dir,
                "checkpoint": self.checkpoint_path, "adapters": final,
                "best": os.path.join(self.output_dir, "best") if self.best_epoch else None,
                "logs": self.logger.log_dir, "plot": self.logger.plot_path}

    def _end_epoch(self, t0: float) -> None:
        """Mean loss, validation, best/ and the checkpoint of the epoch just finished. A
        non-finite epoch (every step skipped, or a non-finite validation score) is logged with
        NaN and never becomes best/; non-finite trainable parameters stop the run."""
        cfg = self.cfg
        counted, skipped = self._epoch_loss_count, self._epoch_skipped
        # Skips are decided on the global loss and gradient, so every rank agrees on `counted`.
        mean_loss = (all_reduce_mean(self._epoch_loss_sum / counted, self.device) if counted
                     else float("nan"))
        finite = self._params_finite()
        self.epoch += 1
        self.batches_done = 0
        self._epoch_loss_sum, self._epoch_loss_count, self._epoch_skipped = 0.0, 0, 0
        self._warn_identical_labels()
        if not finite or not counted:
            metrics = {cfg.val_metric: float("nan")} if self.evaluate is not None else {}
            if counted == 0 and self.dist.is_main:
                log.warning("epoch %d: all %d steps were skipped (non-finite loss or gradient); its "
                            "loss is logged as NaN and it is not validated", self.epoch, skipped)
        else:
            metrics = self._validate()
        record = {"loss": mean_loss, **metrics, "epoch_time_s": time.perf_counter() - t0,
                  "skipped_steps": float(self.skipped_steps)}
        self.history.append({"epoch": self.epoch, "step": self.step, **record})
        self.logger.log_epoch(self.epoch, self.step, record)
        if not finite:
            raise FloatingPointError(
                f"training diverged in epoch {self.epoch}: the trainable parameters are no longer "
                f"finite, so nothing of this epoch was saved. {self._last_good()} Lower lr (now "
                f"{cfg.lr}), set clip_grad_norm or use precision fp32, then --resume auto "
                "--allow-config-change.")
        score = metrics.get(cfg.val_metric)
        if score is not None and not math.isfinite(score):
            if counted and self.dist.is_main:
                log.warning("epoch %d: validation %s is %s; the epoch cannot become best/",
                            self.epoch, cfg.val_metric, score)
            score = None
        if score is not None and (self.best_metric is None or score > self.best_metric):
            self.best_metric, self.best_epoch = score, self.epoch
            self._save_best(os.path.join(self.output_dir, "best"))
        if self.dist.is_main:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in record.items())
            log.info("epoch %d/%d (step %d): %s", self.epoch, cfg.epochs, self.step, shown)
        self.save_checkpoint()

    # --- guards ---------------------------------------------------------------------------
    def _params_finite(self) -> bool:
        """Whether every trainable parameter is finite (one device->host read)."""
        if not self.params:
            return True
        return bool(torch.stack([torch.isfinite(p).all() for p in self.params]).all())

    def _check_finite(self, where: str) -> None:
        if not self._params_finite():
            raise FloatingPointError(
                f"training diverged {where}: the trainable parameters are no longer finite. "
                f"{self._last_good()} Lower lr (now {self.cfg.lr}), set clip_grad_norm or use "
                "precision fp32.")

    def _warn_identical_labels(self) -> None:
        count = self.loss_fn.identical_label_batches()
        if count and not self._warned_identical_labels and self.dist.is_main:
            self._warned_identical_labels = True
            log.warning(
                "%d batch(es) of epoch %d had the same label vector for every pair: label-guided "
                "masking removed every negative, so they gave loss 0 and no gradient. Check the "
                "labels (a constant label column?) or set label_guided: false.", count, self.epoch)

    def _periodic_save_due(self) -> bool:
        """--save-every-steps / --save-every-minutes (the main process's clock decides)."""
        cfg = self.cfg
        due = bool(cfg.save_every_steps) and self.step % cfg.save_every_steps == 0
        if cfg.save_every_minutes:
            late = time.monotonic() - self._last_save >= 60.0 * cfg.save_every_minutes
            if self.dist.distributed:
                late = broadcast_flag(late, self.device)
            due = due or late
        return due

    def _save_if_finite(self) -> None:
        if self._params_finite():
            self.save_checkpoint()
        elif self.dist.is_main:
            log.warning("step %d: the trainable parameters are not finite; the checkpoint is not "
                        "updated", self.step)
