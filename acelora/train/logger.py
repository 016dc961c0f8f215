"""Training logs: CSV files, TensorBoard (when installed) and a PNG plot of loss and metrics."""
from __future__ import annotations

import csv
import logging
import math
import os
from typing import Any

log = logging.getLogger("acelora.train")

# Epoch columns that are not validation metrics.
NOT_PLOTTED = ("epoch", "step", "loss", "epoch_time_s", "skipped_steps")


class MetricLogger:
    """Writes ``steps.csv`` (one row per optimizer step) and ``epochs.csv`` (one row per epoch)
    under ``log_dir``, mirrors scalars to TensorBoard, and draws ``training.png``.

    Only the main process should own one (``enabled=False`` elsewhere makes every call a no-op).
    Rows are appended, so a resumed run continues the same files.
    """

    def __init__(self, log_dir: str, tensorboard: bool = True, enabled: bool = True):
        self.log_dir = log_dir
        self.enabled = enabled
        self.writer = None
        self.steps_csv = os.path.join(log_dir, "steps.csv")
        self.epochs_csv = os.path.join(log_dir, "epochs.csv")
        self.plot_path = os.path.join(log_dir, "training.png")
        if not enabled:
            return
        os.makedirs(log_dir, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(os.path.join(log_dir, "tensorboard"))
            except ImportError as exc:  # tensorboard is optional
                log.warning("TensorBoard logging disabled (%s); CSV logs and plots are still written", exc)

    def resume_at(self, step: int, epoch: int) -> None:
        """Continue the logs of a run resumed at ``step`` / ``epoch``: rows written after that
        checkpoint (the work a crash lost, which the resumed run repeats) are dropped, so no
        step or epoch appears twice; TensorBoard purges its events past ``step`` likewise."""
        if not self.enabled:
            return
        _truncate_csv(self.steps_csv, "step", step)
        _truncate_csv(self.epochs_csv, "epoch", epoch)
        if self.writer is not None:
            from torch.utils.tensorboard import SummaryWriter
            log_dir = self.writer.log_dir
            self.writer.close()
            self.writer = SummaryWriter(log_dir, purge_step=step + 1)

    # --- rows -----------------------------------------------------------------------------
    @staticmethod
    def _append(path: str, row: dict[str, Any]) -> None:
        fields = list(row)
        if os.path.exists(path):
            with open(path, newline="") as f:
                header = next(csv.reader(f), None)
            if header and set(fields) <= set(header):
                fields = header
            elif header:
                # New columns (e.g. a metric that appears later): rewrite with the union.
                with open(path, newline="") as f:
                    rows = list(csv.DictReader(f))
                fields = header + [k for k in fields if k not in header]
                with open(path, "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=fields)
                    w.writeheader()
                    w.writerows(rows)
        new = not os.path.exists(path)
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            if new:
                w.writeheader()
            w.writerow(row)

    def log_step(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._append(self.steps_csv, {"step": step, **values})
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"train/{k}", v, step)

    def log_epoch(self, epoch: int, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        self._append(self.epochs_csv, {"epoch": epoch, "step": step, **values})
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"epoch/{k}", v, step)
            self.writer.flush()
        self.plot()

    # --- plot -----------------------------------------------------------------------------
    def plot(self) -> str | None:
        """Loss per step (and per epoch) plus every epoch metric, in one PNG."""
        if not self.enabled:
            return None
        steps, epochs = _read_csv(self.steps_csv), _read_csv(self.epochs_csv)
        if not steps and not epochs:
            return None
        import matplotlib
        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        metric_keys = [k for k in (epochs[0] if epochs else {}) if k not in NOT_PLOTTED]
        panels = 1 + (1 if metric_keys else 0)
        fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
        ax = axes[0][0]
        if steps and "loss" in steps[0]:
            ax.plot(_col(steps, "step"), _col(steps, "loss"), lw=0.8, alpha=0.7, label="train loss (step)")
        if epochs and "loss" in epochs[0]:
            ax.plot(_col(epochs, "step"), _col(epochs, "loss"), "o-", label="train loss (epoch mean)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        if metric_keys:
            ax = axes[0][1]
            for k in metric_keys:
                ax.plot(_col(epochs, "epoch"), _col(epochs, k), "o-", label=k)
            ax.set_xlabel("epoch")
            ax.set_ylabel("validation metric")
            ax.legend()
            ax.grid(alpha=0.3)
        fig.tight_layout()
        tmp = self.plot_path + ".tmp.png"
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, self.plot_path)
        return self.plot_path

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _truncate_csv(path: str, key: str, last: int) -> None:
    """Keep the rows of ``path`` whose ``key`` is at most ``last`` (rewritten atomically)."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        rows = list(reader)
    kept = [r for r in rows if _as_int(r.get(key)) is None or _as_int(r.get(key)) <= last]
    if len(kept) == len(rows):
        return
    import io

    from acelora.outputs import atomic_write_text

    out = io.StringIO()
    w = csv.DictWriter(out, fieldnames=fields)
    w.writeheader()
    w.writerows(kept)
    atomic_write_text(path, out.getvalue())


def _as_int(value) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def _read_csv(path: str) -> list[dict[str, str]]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _col(rows: list[dict[str, str]], key: str) -> list[float]:
    out = []
    for r in rows:
        try:
            out.append(float(r.get(key) or "nan"))
        except ValueError:
            out.append(math.nan)
    return out
