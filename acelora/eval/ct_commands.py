"""``acelora eval ct-rate``: CT-RATE's 18-finding zero-shot with CT-CLIP's protocol.

Kept apart from :mod:`acelora.eval.commands` (which registers it) so that module stays small;
nothing heavy is imported until the command runs.
"""
from __future__ import annotations

import argparse
import sys


def add_ct_rate_command(tasks, add_model_args, add_run_args) -> None:
    ct = tasks.add_parser("ct-rate", help="CT-RATE 18-finding zero-shot, CT-CLIP protocol "
                          "(AUROC; accuracy and F1 at CT-CLIP's threshold)")
    add_model_args(ct)
    ct.add_argument("--data-root", required=True,
                    help="the CT-RATE download (the folder holding dataset/, or dataset/ itself)")
    ct.add_argument("--split", default="valid", choices=("train", "valid"))
    ct.add_argument("--volumes", default=None, help="volume folder under dataset/ (default: "
                    "<split>_fixed when present, else <split>)")
    ct.add_argument("--rescale", choices=("auto", "yes", "no"), default="auto",
                    help="apply the metadata's slope/intercept (auto: not for a *_fixed folder)")
    ct.add_argument("--threshold-split", choices=("train", "valid"), default=None,
                    help="pick the thresholds on this split (default: on the evaluated split, as "
                    "CT-CLIP does)")
    ct.add_argument("--logit-scale", type=float, default=None,
                    help="similarity multiplier (default: the model's exp(logit_scale))")
    ct.add_argument("--target-shape", type=int, nargs=3, metavar=("D", "H", "W"), default=None,
                    help="preprocessed volume size (default: the model's, else 240 480 480)")
    ct.add_argument("--target-spacing", type=float, nargs=3, metavar=("Z", "X", "Y"), default=None,
                    help="resampling spacing in mm (default: the model's, else 1.5 0.75 0.75)")
    ct.add_argument("--cache-dir", default=None, help="keep preprocessed volumes here (int16)")
    add_run_args(ct)
    ct.set_defaults(func=run_ct_rate, batch_size=1)


def ct_preprocess_for(model, target_shape=None, target_spacing=None):
    """The model's CT preprocessing (``model.preprocess`` when it is a :class:`CTPreprocess`,
    else CT-CLIP's at ``model.volume_shape`` and ``model.config.spacing`` when the model has
    them), with the given overrides."""
    import dataclasses

    from acelora.data.ct_transforms import CTPreprocess

    base = getattr(model, "preprocess", None)
    if not isinstance(base, CTPreprocess):
        own = {}
        if getattr(model, "volume_shape", None) is not None:
            own["target_shape"] = tuple(model.volume_shape)
        if getattr(getattr(model, "config", None), "spacing", None) is not None:
            own["target_spacing"] = tuple(model.config.spacing)
        base = CTPreprocess(**own)
    changes = {}
    if target_shape is not None:
        changes["target_shape"] = tuple(target_shape)
    if target_spacing is not None:
        changes["target_spacing"] = tuple(target_spacing)
    return dataclasses.replace(base, **changes) if changes else base


def run_ct_rate(args: argparse.Namespace) -> int:
    from acelora.data.ctrate import CTRATEDataset
    from acelora.eval import commands
    from acelora.eval.ct_zeroshot import ct_zero_shot_evaluate

    commands._setup_logging()
    model = commands._model(args)
    preprocess = ct_preprocess_for(model, args.target_shape, args.target_spacing)
    rescale = {"auto": None, "yes": True, "no": False}[args.rescale]

    def dataset(split, volumes):
        return CTRATEDataset(args.data_root, split=split, volumes=volumes, preprocess=preprocess,
                             apply_rescale=rescale, with_text=False, cache_dir=args.cache_dir,
                             on_error=args.on_error)

    evaluated = dataset(args.split, args.volumes)
    held_out = None
    if args.threshold_split and args.threshold_split != args.split:
        held_out = dataset(args.threshold_split, None)
    elif args.threshold_split:
        print(f"--threshold-split {args.threshold_split} is the evaluated split; omit it to pick "
              "the thresholds on the evaluated split (CT-CLIP's way)", file=sys.stderr)
        return 2
    result = ct_zero_shot_evaluate(model, evaluated, threshold_dataset=held_out,
                                   threshold_split=args.threshold_split, logit_scale=args.logit_scale,
                                   batch_size=args.batch_size, num_workers=args.num_workers,
                                   on_error=args.on_error, merge=not args.no_merge, out_dir=args.out,
                                   name=f"ct_rate_{args.split}")
    fmt = commands._fmt
    print(f"CT-RATE {args.split} ({evaluated.volume_dir}, rescale={evaluated.apply_rescale}): "
          f"n={result['n']} skipped={result['skipped']}")
    print(f"thresholds: {result['threshold_source']}")
    for name, row in result["per_finding"].items():
        print(f"  {name:36s} auroc {fmt(row['auroc'])}  acc {fmt(row['accuracy'])}  "
              f"weighted-F1 {fmt(row['weighted_f1'])}  F1(present) {fmt(row['positive_f1'])}")
    print(f"  {'mean':36s} auroc {fmt(result['mean_auroc'])}  acc {fmt(result['mean_accuracy'])}  "
          f"weighted-F1 {fmt(result['mean_weighted_f1'])}  F1(present) {fmt(result['mean_positive_f1'])}")
    commands._record_provenance(args, result)
    print(f"report: {result['files']['json']}")
    return 0
