"""The ``train`` and ``demo`` sub-commands of ``acelora`` (see acelora/cli.py)."""
from __future__ import annotations

import argparse
import logging
import sys

# Command-line flags that map one-to-one onto config keys (flag -> key, type).
_FLAG_OVERRIDES = (
    ("--model", "model", str), ("--adapters", "adapters", str), ("--dataset", "dataset", str),
    ("--data-root", "data_root", str), ("--output-dir", "output_dir", str),
    ("--epochs", "epochs", int), ("--batch-size", "batch_size", int), ("--lr", "lr", float),
    ("--weight-decay", "weight_decay", float), ("--warmup-steps", "warmup_steps", int),
    ("--grad-accum", "grad_accum", int), ("--precision", "precision", str),
    ("--seed", "seed", int), ("--val", "val", str), ("--val-root", "val_root", str),
    ("--max-steps", "max_steps", int), ("--device", "device", str),
    ("--num-workers", "num_workers", int), ("--resume", "resume", str),
    ("--nan-policy", "nan_policy", str),
)


def add_commands(subparsers) -> None:
    """Register ``train`` and ``demo``."""
    p = subparsers.add_parser(
        "train", help="train ACE-LoRA adapters (torchrun-aware)",
        description="Train ACE-LoRA from a YAML/JSON config (flat keys: run settings such as "
                    "model, dataset, data_root, output_dir, and method settings such as lr, "
                    "epochs, lora_rank). Precedence: preset < config file < flags < --set. "
                    "Multi-GPU: torchrun --nproc_per_node=N -m acelora train ...",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="YAML or JSON config file")
    p.add_argument("--preset", choices=None, help="method preset: paper | official")
    for flag, key, typ in _FLAG_OVERRIDES:
        p.add_argument(flag, dest=f"ov_{key}", type=typ, default=None, help=f"config key {key!r}")
    p.add_argument("--grad-checkpointing", dest="ov_grad_checkpointing", action="store_const",
                   const=True, default=None, help="recompute block activations in backward")
    p.add_argument("--no-tensorboard", dest="ov_tensorboard", action="store_const", const=False,
                   default=None)
    p.add_argument("--no-progress", dest="ov_progress", action="store_const", const=False, default=None)
    p.add_argument("--set", dest="set_", action="append", default=[], metavar="KEY=VALUE",
                   help="any config key, repeatable (e.g. --set lora_rank=8 --set hgnn_topk=3)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=train_command)

    d = subparsers.add_parser(
        "demo", help="CPU demo: generalist -> shifted domain -> ACE-LoRA adaptation",
        description="Train a tiny generalist CLIP on synthetic chest X-rays, then adapt it with "
                    "ACE-LoRA to a shifted acquisition domain, and print zero-shot accuracy "
                    "before and after.")
    d.add_argument("--output-dir", default="acelora-demo")
    d.add_argument("--quick", action="store_true", help="a ~30 s version (smaller sets, fewer steps)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="cpu")
    d.add_argument("--no-progress", action="store_true")
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
    try:
        cfg = resolve_train_config(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"acelora train: error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        import json
        print(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
        return 0
    _setup_logging()
    from acelora.train.run import format_summary, run_training

    summary = run_training(cfg)
    from acelora.train.distributed import _env_int
    if _env_int("RANK", 0) == 0:
        print(format_summary(summary), flush=True)
    return 0


def demo_command(args: argparse.Namespace) -> int:
    _setup_logging()
    from acelora.train.demo import run_demo

    result = run_demo(args.output_dir, quick=args.quick, seed=args.seed, device=args.device,
                      progress=not args.no_progress)
    if result["after"]["accuracy"] <= result["before"]["accuracy"]:
        print("warning: adaptation did not raise the zero-shot accuracy in this run", file=sys.stderr)
    return 0
