"""``acelora import-official``: the released ACE-LoRA checkpoint into an adapter folder."""
from __future__ import annotations

import argparse


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "import-official", help="convert the released ACE_LoRA.pt into an acelora adapter folder",
        description="Convert the released ACE-LoRA checkpoint (read with weights_only=True) into "
                    "this library's adapter format with the 'official' preset.")
    p.add_argument("checkpoint", help="path of ACE_LoRA.pt")
    p.add_argument("out_dir", help="adapter folder to write")
    p.add_argument("--model", default="biomedclip",
                   help="the base the adapters go on: biomedclip | tiny | a model folder (a folder's "
                        "weights are fingerprinted so later loads refuse another base)")
    p.set_defaults(func=_import_official)


def _import_official(args: argparse.Namespace) -> int:
    from acelora.models.official import import_official_checkpoint
    out = import_official_checkpoint(args.checkpoint, args.out_dir, base=args.model)
    print(f"wrote adapters to {out}  (load with: acelora eval zeroshot --model {args.model} "
          f"--adapters {out} ...)")
    return 0
