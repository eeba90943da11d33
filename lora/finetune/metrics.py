"""The training metrics a run leaves in its output directory: ``metrics.jsonl`` (one JSON row per
logged step or evaluation) and ``loss_curve.png`` drawn from it (when matplotlib is installed).

The trainer appends rows; a resumed run first drops the rows the interrupted one logged after its
checkpoint. Reading and plotting need no trainer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .._io import atomic_open

__all__ = ["METRICS_FILE", "append_metrics", "read_metrics", "truncate_metrics", "plot_metrics"]

METRICS_FILE = "metrics.jsonl"


def append_metrics(output_dir: str | os.PathLike, row: dict) -> None:
    """Append ``row`` as one JSON line to ``output_dir/metrics.jsonl`` (creating the directory)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def truncate_metrics(output_dir: str | os.PathLike, step: int) -> None:
    """Keep only the rows of steps <= ``step`` (and drop a line cut by a kill), atomically."""
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return
    rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    keep = []
    for line in rows:
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            pass  # a line cut by the kill
    with atomic_open(path, "w") as f:
        f.write("".join(r + "\n" for r in keep))


def read_metrics(output_dir: str | os.PathLike) -> list[dict]:
    """The rows of ``output_dir/metrics.jsonl`` (empty when there is none)."""
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            rows.append(json.loads(line))
    return rows


def plot_metrics(output_dir: str | os.PathLike) -> Path | None:
    """``loss_curve.png`` from metrics.jsonl when matplotlib is installed; None otherwise."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(output_dir)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("LoRA fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(output_dir) / "loss_curve.png"
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
    return path
