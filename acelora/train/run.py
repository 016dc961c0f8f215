"""``acelora train``: model, data and validation from a :class:`TrainConfig`, then the loop."""
from __future__ import annotations

import logging
import os
from typing import Any, Callable

from torch import nn

from acelora.train.distributed import DistInfo, cleanup_distributed, init_distributed
from acelora.train.distributed import all_ranks_ok
from acelora.train.loop import Trainer, seed_everything, zero_shot_accuracy
from acelora.train.run_folder import claim_run_folder
from acelora.train.settings import TrainConfig

log = logging.getLogger("acelora.train")

VAL_SEED_OFFSET = 7777  # held-out synthetic items come from another seed than the training ones


def build_train_dataset(cfg: TrainConfig, model: nn.Module):
    """The image–text training set of ``cfg.dataset``."""
    if cfg.dataset == "synthetic":
        from acelora.data.synthetic import SyntheticCXRPairs
        return SyntheticCXRPairs(cfg.synthetic_size, image_size=model.image_size,
                                 domain=cfg.synthetic_domain, seed=cfg.seed, cache=True,
                                 transform=model.image_transform())
    if cfg.dataset == "mimic":
        from acelora.data.labels import LabelPolicy
        from acelora.data.mimic import MimicCXRDataset
        return MimicCXRDataset(cfg.data_root, split="train",
                               transform=model.image_transform(train=True),
                               label_policy=LabelPolicy.from_config(cfg.method), on_error="skip")
    if cfg.dataset == "captions":
        from acelora.data.captions import ImageCaptionDataset
        return ImageCaptionDataset(cfg.data_root, image_column=cfg.image_column,
                                   caption_column=cfg.caption_column, label_columns=cfg.label_columns,
                                   transform=model.image_transform(train=True),
                                   on_error="skip")
    if cfg.dataset == "ct-rate":
        from acelora.train.ct import ct_rate_train_dataset
        return ct_rate_train_dataset(cfg, model)
    raise ValueError(f"unknown dataset {cfg.dataset!r}")


def build_evaluator(cfg: TrainConfig, model: nn.Module) -> tuple[Callable | None, str]:
    """(evaluate(model) -> metrics, name of the metric that picks the best epoch)."""
    kind = cfg.val
    if kind == "auto":
        kind = {"synthetic": "synthetic", "ct-rate": "ct-rate"}.get(cfg.dataset, "none")
    if kind == "none":
        return None, cfg.val_metric
    if kind == "ct-rate":
        from acelora.train.ct import ct_rate_evaluator
        return ct_rate_evaluator(cfg, model)
    if kind == "synthetic":
        from acelora.data.synthetic import SyntheticCXRPairs
        val = SyntheticCXRPairs(cfg.val_size, image_size=model.image_size,
                                domain=cfg.synthetic_domain, seed=cfg.seed + VAL_SEED_OFFSET,
                                cache=True, transform=model.image_transform())
        return (lambda mdl: zero_shot_accuracy(mdl, val)), cfg.val_metric
    transform = model.image_transform()
    if kind == "chexpert5x200":
        from acelora.data.classification import CheXpert5x200Dataset
        data = CheXpert5x200Dataset(cfg.val_root, transform=transform)
        return (lambda mdl: zero_shot_accuracy(mdl, data)), cfg.val_metric
    if kind == "nih":
        from acelora.data.classification import NIHChestXray14Dataset
        from acelora.eval.multilabel import multilabel_evaluate
        data = NIHChestXray14Dataset(cfg.val_root, split="test", transform=transform, on_error="skip")

        def evaluate(mdl):
            out = multilabel_evaluate(mdl, data, merge=False)
            return {k: v for k, v in out.items() if isinstance(v, (int, float)) and k != "n"}
        metric = "mean_auroc" if cfg.val_metric == "accuracy" else cfg.val_metric
        return evaluate, metric
    if kind in ("lc25000-lung", "lc25000-colon", "mhist"):
        # Validate on the held-out images (LC25000's hash hold-out, MHIST's test partition).
        from acelora.eval.loading import build_zeroshot_dataset
        data = build_zeroshot_dataset(kind, cfg.val_root, transform, split="test")
        return (lambda mdl: zero_shot_accuracy(mdl, data)), cfg.val_metric
    raise ValueError(f"unknown validation {kind!r}")


def run_training(cfg: TrainConfig, dist_info: DistInfo | None = None, *, overwrite: bool = False,
                 allow_config_change: bool = False) -> dict[str, Any]:
    """Build everything ``cfg`` names and train; returns the loop's summary.

    Before any slow work: a built-in architecture without weights is refused unless
    ``cfg.random_weights``; weight files are checked for truncation; the main process claims
    ``cfg.output_dir`` (lock, writability, an earlier run resumed/replaced/refused)."""
    import acelora
    from acelora import provenance
    from acelora.weight_files import check_model_files

    random_weights = provenance.check_random_weights(cfg.model, None, cfg.random_weights)
    check_model_files(cfg.model, adapters=cfg.adapters)
    owns_group = dist_info is None
    dist_info = dist_info or init_distributed(cfg.device)
    lock, error = None, None
    try:
        if dist_info.is_main:
            try:
                lock = claim_run_folder(cfg.output_dir, cfg.resume, overwrite)
            except BaseException as exc:
                error = exc
        if not all_ranks_ok(error is None, dist_info.device):
            if error is not None:
                raise error
            raise RuntimeError("the main process could not claim the output folder")
        seed_everything(cfg.seed)  # same initial adapters on every rank
        model = acelora.create_ace_lora(cfg.model, config=cfg.method, adapters=cfg.adapters,
                                        device=dist_info.device, backend=cfg.backend)
        model.train()
        record = None
        if dist_info.is_main:
            print(model.trainable_parameter_report(), flush=True)
            record = provenance.collect(model, cfg.model, adapters=cfg.adapters, preset=cfg.preset,
                                        random_weights=random_weights)
        seed_everything(cfg.seed + dist_info.rank)  # independent dropout per rank
        train = build_train_dataset(cfg, model)
        evaluate, metric = build_evaluator(cfg, model)
        if metric != cfg.val_metric:
            cfg = cfg.replace(val_metric=metric)
        # The folder is claimed (and, with overwrite, emptied) already: the trainer re-enters
        # the same lock.
        trainer = Trainer(model, train, cfg, evaluate=evaluate, dist_info=dist_info,
                          allow_config_change=allow_config_change, provenance=record)
        summary = trainer.fit()
        summary["model"] = model
        return summary
    finally:
        if lock is not None:
            lock.release()
        if owns_group:
            cleanup_distributed()


def format_summary(summary: dict[str, Any]) -> str:
    lines = [f"trained {summary['steps']} step(s), {summary['epochs']} epoch(s); "
             f"skipped (non-finite) steps: {summary['skipped_steps']}"]
    if summary.get("best_epoch"):
        lines.append(f"best validation {summary['best_metric']:.4f} at epoch {summary['best_epoch']}"
                     f" -> {summary['best']}")
    kinds = "CSV, TensorBoard" if os.path.isdir(os.path.join(summary["logs"], "tensorboard")) else "CSV"
    lines += [f"adapters:   {summary['adapters']}", f"checkpoint: {summary['checkpoint']}",
              f"logs:       {summary['logs']} ({kinds})", f"plot:       {summary['plot']}"]
    return "\n".join(lines)
