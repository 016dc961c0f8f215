"""The ``train`` and ``demo`` sub-commands of ``acelora`` (see acelora/cli.py)."""
from __future__ import annotations

import argparse
import logging
import sys

# Command-line flags that map one-to-one onto config keys: (flag, key, type, metavar, help).
# "{default}" in a help text is replaced by the key's real default (settings/config dataclasses).
_FLAG_OVERRIDES = (
    ("--model", "model", str, "NAME_OR_DIR",
     "base model: a weights folder, hf-hub:NAME (local Hugging Face cache) or a built-in "
     "architecture (tiny | biomedclip: random weights, needs --random-weights); default {default}"),
    ("--adapters", "adapters", str, "DIR", "start from saved adapters (default: fresh adapters)"),
    ("--dataset", "dataset", str, "NAME", "training data: {choices} (default {default})"),
    ("--data-root", "data_root", str, "DIR",
     "the training data set's folder (or CSV), for every dataset but synthetic"),
    ("--output-dir", "output_dir", str, "DIR", "run folder for checkpoints, adapters and logs "
     "(default {default})"),
    ("--epochs", "epochs", int, "N", "epochs (default {default})"),
    ("--batch-size", "batch_size", int, "N",
     "contrastive batch of one optimizer step over all GPUs (default {default})"),
    ("--lr", "lr", float, "LR", "peak learning rate (default {default})"),
    ("--weight-decay", "weight_decay", float, "WD", "AdamW weight decay (default {default})"),
    ("--warmup-steps", "warmup_steps", int, "N", "linear warm-up steps (default {default})"),
    ("--grad-accum", "grad_accum", int, "K",
     "split each batch into K micro-batches with the exact full-batch gradient (default {default})"),
    ("--precision", "precision", str, "{auto,fp32,bf16}",
     "auto = bf16 autocast on a GPU, fp32 on the CPU (default {default})"),
    ("--seed", "seed", int, "N", "seed of adapters, data order and dropout (default {default})"),
    ("--val", "val", str, "NAME", "validation after each epoch: {val_choices} (default {default}: "
     "synthetic for synthetic data, else none)"),
    ("--val-root", "val_root", str, "DIR", "the validation set's folder"),
    ("--max-steps", "max_steps", int, "N", "stop after N optimizer steps in all (default: run "
     "every epoch)"),
    ("--device", "device", str, "DEVICE", "cpu | cuda | cuda:N (default: cuda when available)"),
    ("--num-workers", "num_workers", int, "N", "data loader worker processes (default {default})"),
    ("--resume", "resume", str, "CKPT",
     "continue from a checkpoint file, or 'auto': the run folder's last checkpoint if there is "
     "one, else start fresh"),
    ("--nan-policy", "nan_policy", str, "{skip,error}",
     "a step with a non-finite loss or gradient: skip it (at most --max-nan-skips) or stop "
     "(default {default})"),
    ("--max-nan-skips", "max_nan_skips", int, "N",
     "stop the run after more than N skipped steps (default {default})"),
    ("--save-every-steps", "save_every_steps", int, "N",
     "also write the resumable checkpoint every N optimizer steps (default: each epoch only)"),
    ("--save-every-minutes", "save_every_minutes", float, "M",
     "also write the resumable checkpoint every M minutes (default: each epoch only)"),
)


def _flag_help(key: str, text: str) -> str:
    from acelora.train.settings import DATASETS, VALIDATIONS, _field_defaults

    default = _field_defaults().get(key)
    return text.format(default=default, choices=" | ".join(DATASETS),
                       val_choices=" | ".join(VALIDATIONS))


def add_commands(subparsers) -> None:
    """Register ``train`` and ``demo``."""
    p = subparsers.add_parser(
        "train", help="train ACE-LoRA adapters (torchrun-aware)",
        description="Train ACE-LoRA from a YAML/JSON config (flat keys: run settings such as "
                    "model, dataset, data_root, output_dir, lr, epochs, and method settings such "
                    "as lora_rank, hgnn_topk). Precedence: preset < config file < flags < --set. "
                    "Examples: configs/ in the repository. "
                    "Multi-GPU: torchrun --nproc_per_node=N -m acelora train ...")
    p.add_argument("--config", metavar="FILE", help="YAML or JSON config file (flat keys)")
    from acelora.config import PRESETS
    p.add_argument("--preset", choices=tuple(PRESETS), metavar="{" + ",".join(PRESETS) + "}",
                   help="method preset the method settings start from (default: the config "
                        "file's, else paper; medct: CT-CLIP, LoRA on both towers, no HGNN)")
    for flag, key, typ, metavar, text in _FLAG_OVERRIDES:
        p.add_argument(flag, dest=f"ov_{key}", type=typ, default=None, metavar=metavar,
                       help=_flag_help(key, text))
    p.add_argument("--random-weights", dest="ov_random_weights", action="store_const", const=True,
                   default=None, help="allow a built-in architecture without weights (randomly "
                   "initialised, seeded): for tests and demos only")
    p.add_argument("--grad-checkpointing", dest="ov_grad_checkpointing", action="store_const",
                   const=True, default=None, help="recompute block activations in backward "
                   "(less memory, one more forward)")
    p.add_argument("--no-tensorboard", dest="ov_tensorboard", action="store_const", const=False,
                   default=None, help="write CSV logs and the plot only")
    p.add_argument("--no-progress", dest="ov_progress", action="store_const", const=False,
                   default=None, help="no progress bar")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous run in --output-dir (its adapters, best/, checkpoints, "
                        "logs); without it such a folder is refused")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: apply changed result-affecting settings (lr, seed, data, "
                        "...) instead of refusing, and record the change in config.json's history")
    p.add_argument("--set", dest="set_", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, repeatable (e.g. --set lora_rank=8 --set hgnn_topk=3)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=train_command)

    d = subparsers.add_parser(
        "demo", help="CPU demo: generalist -> shifted domain -> ACE-LoRA adaptation",
        description="Train a tiny generalist CLIP on synthetic chest X-rays, then adapt it with "
                    "ACE-LoRA to a shifted acquisition domain, and print zero-shot accuracy "
                    "before and after. A demo re-run replaces the previous demo in its folder.")
    d.add_argument("--output-dir", metavar="DIR", default=None,
                   help="output folder (default: acelora-demo, or acelora-demo-quick with --quick)")
    d.add_argument("--quick", action="store_true", help="a ~30 s version (smaller sets, fewer steps)")
    d.add_argument("--ct", action="store_true",
                   help="the CT demo instead: ct-clip-tiny on synthetic chest CT, LoRA on both "
                        "towers (medct), per-finding AUROC before -> after, mean ± sd over 3 seeds "
                        "(default folder acelora-demo-ct, or acelora-demo-ct-quick)")
    d.add_argument("--ct-quantizer", choices=("straight-through", "bypass"),
                   default="straight-through",
                   help="--ct: train LoRA through CT-CLIP's quantiser (straight-through, CT-CLIP's "
                        "way) or bypass it (default straight-through)")
    d.add_argument("--seed", type=int, default=0, metavar="N", help="seed (default 0)")
    d.add_argument("--device", default="cpu", metavar="DEVICE", help="cpu | cuda (default cpu)")
    d.add_argument("--overwrite", action="store_true",
                   help="use --output-dir even if it holds something other than a previous demo")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=demo_command)


def resolve_train_config(args: argparse.Namespace):
    """The :class:`TrainConfig` of parsed ``train`` arguments."""
    from acelora.train.settings import load_train_config, parse_set_overrides

    overrides = {k[3:]: v for k, v in vars(args).items() if k.startswith("ov_") and v is not None}
    overrides.update(parse_set_overrides(args.set_))
    return load_train_config(args.config, preset=args.preset, overrides=overrides)


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def train_command(args: argparse.Namespace) -> int:
    from acelora.errors import check_device

    cfg = resolve_train_config(args)  # a bad key or value: one line from acelora.cli, exit 2
    if args.print_config:
        import json
        print(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
        return 0
    check_device(cfg.device)
    _setup_logging()
    from acelora.train.run import format_summary, run_training

    summary = run_training(cfg, overwrite=args.overwrite,
                           allow_config_change=args.allow_config_change)
    from acelora.train.distributed import _env_int
    if _env_int("RANK", 0) == 0:
        print(format_summary(summary), flush=True)
    return 0


def demo_command(args: argparse.Namespace) -> int:
    _setup_logging()
    from acelora.train.demo import run_demo

    from acelora.errors import check_device

    check_device(args.device)
    if args.ct:
        from acelora.train.demo_ct import run_ct_demo
        result = run_ct_demo(args.output_dir, quick=args.quick, seed=args.seed, device=args.device,
                             progress=not args.no_progress, overwrite=args.overwrite,
                             ct_quantizer=args.ct_quantizer)
        (before, _), (after, _) = (result["summary"][k]["mean_auroc"] for k in ("before", "after"))
        if after <= before:
            print("warning: adaptation did not raise the mean AUROC in this run", file=sys.stderr)
        return 0
    result = run_demo(args.output_dir, quick=args.quick, seed=args.seed, device=args.device,
                      progress=not args.no_progress, overwrite=args.overwrite)
    if result["after"]["accuracy"] <= result["before"]["accuracy"]:
        print("warning: adaptation did not raise the zero-shot accuracy in this run", file=sys.stderr)
    return 0
