"""The ``acelora`` command. Each area registers its own sub-commands (``add_commands``)."""
from __future__ import annotations

import argparse
import importlib
import sys

# Modules that define ``add_commands(subparsers)``; each sub-command sets ``func(args) -> int``.
COMMAND_MODULES = (
    "acelora.models.commands",  # import-official
    "acelora.train.commands",   # demo, train
    "acelora.eval.commands",    # eval zeroshot|multilabel|segment|detect, predict
    "acelora.benchmark",        # bench
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="acelora",
        description="ACE-LoRA: parameter-efficient adaptation of medical vision-language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
