"""Samples/s of the MIMIC-CXR loader (JPEG decode + BiomedCLIP transform + tokenising collate).

A synthetic MIMIC-CXR-JPG tree (official layout, ``write_mimic``) is written once to a temporary
folder (or ``--root``); then whole epochs of ``MimicCXRDataset`` → ``DataLoader`` with
``ImageTextCollator`` are timed for each worker count. One row per worker count: the median
samples/s over ``--epochs`` epochs (after one warm-up epoch, which also pays the workers'
start-up), with the spread. Nothing runs on a GPU: this is the input pipeline that feeds one.

    python bench/bench_dataloader.py --workers 0 1 2 --studies 128 --source-size 512
    python -m pytest bench/bench_dataloader.py --benchmark-enable       # pytest-benchmark case
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

try:
    from bench import common
except ImportError:  # run as a script
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import common


def word_tokenizer(texts, context_length=None):
    """A stand-in for the model's tokenizer (no vocabulary files needed): hashed words, padded
    to the batch's longest; the cost is of the same order as a WordPiece tokenizer's."""
    rows = [[1] + [2 + hash(w) % 30000 for w in t.lower().split()] + [2] for t in texts]
    length = max(map(len, rows))
    if context_length is not None:
        length = min(length, context_length)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        row = row[:length]
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def make_dataset(root: str | None, studies: int, source_size: int, image_size: int):
    """The MIMIC dataset over a synthetic tree under ``root`` (written if it has no metadata)."""
    from acelora.data.mimic import MimicCXRDataset
    from acelora.data.synthetic import write_mimic
    from acelora.data.transforms import biomedclip_transform

    if not os.path.isfile(os.path.join(root, "mimic-cxr-2.0.0-metadata.csv")):
        t0 = time.perf_counter()
        write_mimic(root, n=studies, seed=0, image_size=source_size)
        print(f"wrote {studies} synthetic studies ({source_size}px JPEGs) to {root} "
              f"in {time.perf_counter() - t0:.1f} s")
    return MimicCXRDataset(root, split=None, transform=biomedclip_transform(image_size))


def time_epochs(dataset, workers: int, batch_size: int, epochs: int) -> dict:
    from torch.utils.data import DataLoader

    from acelora.data.collate import ImageTextCollator

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=ImageTextCollator(word_tokenizer, context_length=256),
                        persistent_workers=workers > 0, drop_last=False)
    rates, n = [], 0
    for epoch in range(epochs + 1):  # epoch 0: warm-up (worker start-up, page cache)
        t0 = time.perf_counter()
        n = sum(batch["images"].shape[0] for batch in loader)
        elapsed = time.perf_counter() - t0
        if epoch:
            rates.append(n / elapsed)
    rates.sort()
    return {"workers": workers, "batch": batch_size, "samples": n, "epochs": epochs,
            "samples_per_s": statistics.median(rates), "min_samples_per_s": rates[0],
            "max_samples_per_s": rates[-1], "ms_per_sample": 1e3 / statistics.median(rates)}


def run(workers=(0, 1, 2), studies: int = 96, source_size: int = 384, image_size: int = 224,
        batch_size: int = 16, epochs: int = 3, root: str | None = None) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="acelora-mimic-") as tmp:
        dataset = make_dataset(root or tmp, studies, source_size, image_size)
        rows = []
        for w in workers:
            row = time_epochs(dataset, w, batch_size, epochs)
            row.update(source_px=source_size, image_size=image_size)
            rows.append(row)
        base = rows[0]["samples_per_s"]
        for row in rows:
            row["speedup"] = row["samples_per_s"] / base
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--studies", type=int, default=96, help="synthetic MIMIC studies (≈1.3 frontal images each)")
    p.add_argument("--source-size", type=int, default=384, help="side of the stored JPEGs (MIMIC's are ~2500)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--root", default=None, help="keep/reuse the synthetic tree here")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the main process")
    p.add_argument("--no-write", action="store_true", help="print only; no JSON file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.workers, args.studies, args.source_size, args.image_size, args.batch_size,
               args.epochs, args.root)
    common.print_table(rows, ["workers", "batch", "samples", "source_px", "image_size", "samples_per_s",
                              "min_samples_per_s", "max_samples_per_s", "ms_per_sample", "speedup"])
    summary = {"cpu_count": os.cpu_count()}
    if not args.no_write:
        summary["file"] = common.write_results("dataloader-mimic", rows, summary)
        print(f"wrote {summary['file']}")
    return {"rows": rows, **summary}


def test_mimic_loader_epoch(benchmark, tmp_path):
    """pytest-benchmark case: one epoch of a small synthetic MIMIC set, no workers."""
    from torch.utils.data import DataLoader

    from acelora.data.collate import ImageTextCollator

    dataset = make_dataset(str(tmp_path), studies=16, source_size=128, image_size=64)
    loader = DataLoader(dataset, batch_size=8, collate_fn=ImageTextCollator(word_tokenizer))
    n = benchmark(lambda: sum(b["images"].shape[0] for b in loader))
    assert n == len(dataset)


if __name__ == "__main__":
    main()
