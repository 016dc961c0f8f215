"""``acelora eval {zeroshot,multilabel,segment,detect}`` and ``acelora predict``."""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys

from acelora.eval.loading import MULTILABEL_DATASETS, ZEROSHOT_DATASETS, ZEROSHOT_DEFAULT_SPLIT


class _DeprecatedAlias(argparse.Action):
    """A hidden old spelling of an option: stores into the new option's dest, with a note."""

    def __init__(self, *args, new: str = "", **kwargs):
        self.new = new
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"acelora: note: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="biomedclip", metavar="NAME_OR_DIR",
                   help="base model: a weights folder, hf-hub:NAME (local Hugging Face cache), or a "
                        "built-in architecture (biomedclip | tiny: random weights, needs "
                        "--random-weights); default biomedclip")
    g.add_argument("--random-weights", action="store_true",
                   help="allow a built-in architecture without weights (randomly initialised, "
                        "seeded): for tests only, its outputs mean nothing")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--adapters", metavar="DIR", help="folder of saved ACE-LoRA adapters "
                     "(default: the base model alone)")
    src.add_argument("--official", metavar="CKPT", help="the released ACE_LoRA.pt checkpoint")
    g.add_argument("--preset", dest="config", default=None, choices=("paper", "official"),
                   metavar="{paper,official}",
                   help="method preset for --official or a fresh ACE-LoRA model (default: the "
                        "adapters' own; --official: official)")
    g.add_argument("--config", dest="config", action=_DeprecatedAlias, new="--preset",
                   help=argparse.SUPPRESS)
    g.add_argument("--device", default=None, metavar="DEVICE",
                   help="cpu | cuda | cuda:N (default: cuda when available)")
    g.add_argument("--no-merge", action="store_true",
                   help="keep LoRA as a side branch instead of folding it into the weights")


def _add_data_root(p: argparse.ArgumentParser, help: str) -> None:
    """``--data-root`` (the name ``acelora train`` uses); ``--root`` is a hidden old spelling."""
    p.add_argument("--data-root", dest="root", metavar="DIR", default=None, help=help + " (required)")
    p.add_argument("--root", dest="root", action=_DeprecatedAlias, new="--data-root",
                   help=argparse.SUPPRESS)


def _add_run_args(p: argparse.ArgumentParser, out_required: bool = True) -> None:
    p.add_argument("--batch-size", type=int, default=64, metavar="N",
                   help="images per forward pass (default 64)")
    p.add_argument("--num-workers", type=int, default=0, metavar="N",
                   help="data loader worker processes (default 0)")
    p.add_argument("--on-error", choices=("skip", "raise"), default="skip",
                   help="unreadable images: count and skip (default) or stop")
    p.add_argument("--out", "--output-dir", dest="out", required=out_required, metavar="DIR",
                   help="folder for the report files (checked writable before the evaluation)")


def _add_scoring_args(p: argparse.ArgumentParser) -> None:
    """How classes are scored (DESIGN §9); both choices are recorded in the report."""
    g = p.add_argument_group("class scoring")
    g.add_argument("--class-embedding", choices=("per-prompt", "token-mean"), default=None,
                   help="per-prompt: refine each prompt, average; token-mean: average the prompts' "
                        "tokens and CLS-attention rows, refine once, as the public ACE-LoRA scripts "
                        "(default: token-mean for the official preset, else per-prompt)")
    g.add_argument("--logit-scale", choices=("base", "checkpoint"), default=None,
                   help="the softmax multiplier: the base model's or the checkpoint's learned one "
                        "(default: base for the official preset, as the public scripts; else checkpoint)")


def _scoring(args, model) -> tuple[str, str]:
    """The class-embedding rule and logit-scale source, checked before any data is read."""
    from acelora.eval.zeroshot import resolve_class_embedding, resolve_logit_scale

    return (resolve_class_embedding(model, args.class_embedding),
            resolve_logit_scale(model, args.logit_scale)[0])


def _add_downstream_args(p: argparse.ArgumentParser) -> None:
    _add_data_root(p, "the dataset folder (official layout)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0], metavar="F",
                   help="fractions of the training split to train the head on (default 0.01 0.1 1)")
    p.add_argument("--epochs", type=int, default=20, metavar="N", help="head epochs (default 20)")
    p.add_argument("--min-steps", type=int, default=100, metavar="N",
                   help="train each head for at least this many optimizer steps (default 100)")
    p.add_argument("--lr", type=float, default=1e-3, metavar="LR", help="head learning rate (default 0.001)")
    p.add_argument("--head-batch-size", type=int, default=16, metavar="N",
                   help="head training batch (default 16)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed (default 0)")


def add_commands(subparsers) -> None:
    ev = subparsers.add_parser("eval", help="evaluate a model (zero-shot, multi-label, downstream)",
                               description="Evaluate a base or ACE-LoRA model.")
    tasks = ev.add_subparsers(dest="task", metavar="TASK")
    ev.set_defaults(func=lambda args: (ev.print_help(), 2)[1])

    zs = tasks.add_parser("zeroshot", help="zero-shot classification (accuracy, balanced acc., F1, AUROC)")
    _add_model_args(zs)
    zs.add_argument("--dataset", required=True, choices=ZEROSHOT_DATASETS,
                    help="the data set's layout (its protocol's classes and prompts by default)")
    _add_data_root(zs, "dataset folder (or the CSV file for --dataset csv / chexpert5x200)")
    zs.add_argument("--split", default=None, help="rsna/siim: train | valid | test | all; "
                    "mhist: train | test | all; lc25000-*: all | train | test (default: test; "
                    "lc25000-*: all)")
    zs.add_argument("--classes", nargs="+", help="class names for the prompts (default: the protocol's)")
    zs.add_argument("--templates", nargs="+", help="prompt templates with {c} (default: DESIGN §9's; "
                    "lc25000-*/mhist: the pathology ones)")
    zs.add_argument("--image-col", default="path", help="--dataset csv: image path column")
    zs.add_argument("--label-col", default="label", help="--dataset csv: class column")
    _add_scoring_args(zs)
    _add_run_args(zs)
    zs.set_defaults(func=run_zeroshot)

    ml = tasks.add_parser("multilabel", help="per-finding positive/negative prompts (AUROC, acc., F1)")
    _add_model_args(ml)
    ml.add_argument("--dataset", required=True, choices=MULTILABEL_DATASETS,
                    help="nih: the ChestX-ray14 layout; csv: image column + one column per finding")
    _add_data_root(ml, "NIH folder, or the CSV file for --dataset csv")
    ml.add_argument("--split", default="test", help="nih split: test | train_val | all")
    ml.add_argument("--classes", nargs="+",
                    help="finding names (csv: the columns to use; default every other column)")
    ml.add_argument("--positive-templates", nargs="+", help="positive prompt templates with {c}")
    ml.add_argument("--negative-templates", nargs="+", help="negative prompt templates with {c}")
    ml.add_argument("--image-col", default="path", help="--dataset csv: image path column")
    _add_run_args(ml)
    ml.set_defaults(func=run_multilabel)

    from acelora.eval.ct_commands import add_ct_rate_command
    add_ct_rate_command(tasks, _add_model_args, _add_run_args)

    seg = tasks.add_parser("segment", help="SIIM segmentation with a decoder on frozen patch tokens (Dice)")
    _add_model_args(seg)
    _add_downstream_args(seg)
    _add_run_args(seg)
    seg.set_defaults(func=run_segment)

    det = tasks.add_parser("detect", help="RSNA detection with a head on frozen patch tokens (mAP)")
    _add_model_args(det)
    _add_downstream_args(det)
    _add_run_args(det)
    det.set_defaults(func=run_detect)

    pr = subparsers.add_parser("predict", help="zero-shot class probabilities of image files",
                               description="Per-class probabilities of DICOM/PNG/JPEG images.")
    pr.add_argument("images", nargs="+", metavar="IMAGE")
    pr.add_argument("--classes", nargs="+", required=True, help="class names (at least two)")
    pr.add_argument("--templates", nargs="+", help="prompt templates with {c}")
    _add_model_args(pr)
    _add_scoring_args(pr)
    pr.add_argument("--batch-size", type=int, default=16, metavar="N",
                    help="images per forward pass (default 16)")
    pr.add_argument("--json", action="store_true",
                    help="print JSON (predictions and provenance) instead of a table")
    pr.set_defaults(func=run_predict)


# --- runners ------------------------------------------------------------------------------

def _device(args):
    if args.device:
        return args.device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _model(args):
    """The model the arguments name, after the checks that need no model (device, weights
    present or --random-weights, output folder writable); its provenance goes to
    ``args.provenance`` for the report."""
    from acelora import provenance
    from acelora.errors import UserError, check_device
    from acelora.eval.loading import load_model
    from acelora.outputs import check_writable

    check_device(args.device)
    if hasattr(args, "root") and not args.root:
        raise UserError("--data-root is required: the dataset's folder (or CSV file)")
    if getattr(args, "out", None):
        check_writable(args.out, "--out")
    random_weights = provenance.check_random_weights(args.model, None, args.random_weights)
    model = load_model(args.model, adapters=args.adapters, official=args.official,
                       config=args.config, device=_device(args), random_weights=random_weights)
    if random_weights:
        print(f"acelora: note: --model {args.model} with --random-weights: random (seeded) "
              "weights, the results mean nothing", file=sys.stderr)
    args.provenance = provenance.collect(model, args.model, adapters=args.adapters,
                                         official=args.official, random_weights=random_weights)
    return model


def _record_provenance(args, result: dict) -> None:
    """The model's provenance into the JSON report the evaluation wrote."""
    from acelora.provenance import add_to_report

    path = (result.get("files") or {}).get("json")
    if path and getattr(args, "provenance", None):
        add_to_report(path, args.provenance)
        result["provenance"] = args.provenance


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def run_zeroshot(args) -> int:
    from acelora.eval.loading import build_zeroshot_dataset, dataset_transform
    from acelora.eval.zeroshot import zero_shot_evaluate

    _setup_logging()
    model = _model(args)
    rule, scale = _scoring(args, model)
    split = args.split or ZEROSHOT_DEFAULT_SPLIT.get(args.dataset, "test")
    dataset = build_zeroshot_dataset(args.dataset, args.root, dataset_transform(model), split=split,
                                     image_col=args.image_col, label_col=args.label_col,
                                     # csv: --classes also fixes the label order (names or ids)
                                     classes=args.classes if args.dataset == "csv" else None,
                                     on_error=args.on_error)
    result = zero_shot_evaluate(model, dataset, classnames=args.classes, templates=args.templates,
                                batch_size=args.batch_size, num_workers=args.num_workers,
                                on_error=args.on_error, merge=not args.no_merge, out_dir=args.out,
                                name=f"zeroshot_{args.dataset}", class_embedding=rule,
                                logit_scale=scale)
    print(f"zero-shot {args.dataset}: n={result['n']} skipped={result['skipped']} "
          f"(class embedding {rule}, logit scale {scale} = {result['logit_scale']:.4g})")
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "auroc"):
        print(f"  {key:18s} {_fmt(result[key])}")
    print("  (accuracy is plain; balanced_accuracy = mean per-class recall, what the public "
          "ACE-LoRA CheXpert script reports as accuracy)")
    _record_provenance(args, result)
    print(f"report: {result['files']['json']}")
    return 0


def run_multilabel(args) -> int:
    from acelora.eval.loading import build_multilabel_dataset, dataset_transform
    from acelora.eval.multilabel import multilabel_evaluate
    from acelora.eval.prompts import NEGATIVE_TEMPLATES, POSITIVE_TEMPLATES, finding_text

    _setup_logging()
    model = _model(args)
    columns = args.classes if args.dataset == "csv" else None
    dataset = build_multilabel_dataset(args.dataset, args.root, dataset_transform(model), split=args.split,
                                       image_col=args.image_col, findings=columns, on_error=args.on_error)
    findings = [finding_text(c) for c in args.classes] if args.classes else None
    result = multilabel_evaluate(model, dataset, findings=findings,
                                 positive_templates=args.positive_templates or POSITIVE_TEMPLATES,
                                 negative_templates=args.negative_templates or NEGATIVE_TEMPLATES,
                                 batch_size=args.batch_size, num_workers=args.num_workers,
                                 on_error=args.on_error, merge=not args.no_merge, out_dir=args.out,
                                 name=f"multilabel_{args.dataset}")
    print(f"multi-label {args.dataset}: n={result['n']} skipped={result['skipped']}")
    for name, row in result["per_finding"].items():
        print(f"  {name:32s} auroc {_fmt(row['auroc'])}  acc {_fmt(row['accuracy'])}  f1 {_fmt(row['f1'])}")
    print(f"  {'mean':32s} auroc {_fmt(result['mean_auroc'])}  acc {_fmt(result['mean_accuracy'])}  "
          f"f1 {_fmt(result['macro_f1'])}")
    _record_provenance(args, result)
    print(f"report: {result['files']['json']}")
    return 0


def _downstream(args, task: str) -> int:
    from acelora.eval import downstream
    from acelora.eval.loading import _evaluation_mode, dataset_transform

    _setup_logging()
    model = _model(args)
    transform = dataset_transform(model)
    common = dict(fractions=args.fractions, epochs=args.epochs, batch_size=args.head_batch_size,
                  lr=args.lr, min_steps=args.min_steps, seed=args.seed,
                  num_workers=args.num_workers, on_error=args.on_error, out_dir=args.out)
    if task == "segment":
        from acelora.data.siim import SIIMPneumothoraxDataset

        train, test = (_evaluation_mode(SIIMPneumothoraxDataset(
            args.root, split=s, transform=transform, with_mask=True, on_error=args.on_error))
            for s in ("train", "test"))
        result = downstream.segmentation_evaluate(model, train, test, name="segment_siim", **common)
        metric = "dice"
    else:
        from acelora.data.rsna import RSNAPneumoniaDataset

        train, test = (_evaluation_mode(RSNAPneumoniaDataset(
            args.root, split=s, transform=transform, on_error=args.on_error)) for s in ("train", "test"))
        result = downstream.detection_evaluate(model, train, test, name="detect_rsna", **common)
        metric = "map"
        print(f"mAP backend: {result.get('map_backend')}")
    print(f"{task}: n_train={result['n_train']} n_test={result['n_test']} skipped={result['skipped']}")
    if task == "detect" and not result["test_boxes"]:
        print("  note: the test split holds no ground-truth box, so mAP is undefined (n/a)")
    if task == "segment" and not result["test_positives"]:
        print("  note: the test split holds no positive mask; Dice counts empty-vs-empty as 1")
    for key, row in result["fractions"].items():
        print(f"  {key:>5s} of train ({row['n_train']:5d} images): {metric} {_fmt(row[metric])}")
    _record_provenance(args, result)
    print(f"report: {result['files']['json']}")
    return 0


def run_segment(args) -> int:
    return _downstream(args, "segment")


def run_detect(args) -> int:
    return _downstream(args, "detect")


def run_predict(args) -> int:
    from acelora.eval.predict import format_predictions, predict
    from acelora.eval.prompts import DEFAULT_TEMPLATES

    model = _model(args)
    rule, scale = _scoring(args, model)
    results = predict(model, args.images, args.classes, templates=args.templates or DEFAULT_TEMPLATES,
                      batch_size=args.batch_size, merge=not args.no_merge, class_embedding=rule,
                      logit_scale=scale)
    if args.json:
        print(json.dumps({"predictions": results, "class_embedding": rule, "logit_scale_source": scale,
                          "provenance": args.provenance}, indent=2))
    else:
        print(format_predictions(results))
    return 0 if all("probs" in r for r in results) else 1


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="acelora")
    add_commands(parser.add_subparsers(dest="command"))
    ns = parser.parse_args()
    sys.exit(ns.func(ns))
