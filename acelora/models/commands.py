"""``acelora import-official``: the released ACE-LoRA checkpoint into an adapter folder."""
from __future__ import annotations

import argparse
import os


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "import-official", help="convert the released ACE_LoRA.pt into an acelora adapter folder",
        description="Convert the released ACE-LoRA checkpoint (read with weights_only=True) into "
                    "this library's adapter format with the 'official' preset.")
    p.add_argument("checkpoint", metavar="CKPT", help="path of ACE_LoRA.pt")
    p.add_argument("out_dir", metavar="OUT_DIR", help="adapter folder to write")
    p.add_argument("--model", default="biomedclip", metavar="NAME_OR_DIR",
                   help="the base the adapters go on: a BiomedCLIP weights folder or hf-hub:NAME "
                        "(its weights are fingerprinted, so later loads refuse another base), or a "
                        "built-in architecture with --random-weights; default biomedclip")
    p.add_argument("--random-weights", action="store_true",
                   help="allow a built-in architecture without weights (tests only: the adapters "
                        "then match any base of that shape)")
    p.set_defaults(func=_import_official)


def _import_official(args: argparse.Namespace) -> int:
    from acelora.weight_files import check_weight_file
    from acelora.models.official import import_official_checkpoint
    from acelora.provenance import check_random_weights

    check_random_weights(args.model, None, args.random_weights)
    if not os.path.isfile(args.checkpoint):
        raise FileNotFoundError(f"checkpoint {args.checkpoint!r} does not exist")
    check_weight_file(args.checkpoint)
    out = import_official_checkpoint(args.checkpoint, args.out_dir, base=args.model)
    extra = " --random-weights" if args.random_weights else ""
    print(f"wrote adapters to {out}  (load with: acelora eval zeroshot --model {args.model}{extra} "
          f"--adapters {out} ...)")
    return 0
