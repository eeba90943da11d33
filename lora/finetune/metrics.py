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

__all__ = [
    "METRICS_FILE",
    "append_metrics",
    "read_metrics",
    "truncate_metrics",
    "repair_metrics",
    "plot_metrics",
]

METRICS_FILE = "metrics.jsonl"


def append_metrics(output_dir: str | os.PathLike, row: dict) -> None:
    """Append ``row`` as one JSON line to ``output_dir/metrics.jsonl`` (creating the directory)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _rows(path: Path) -> list[str]:
    """The rows of a metrics.jsonl; a last line cut by a kill is left out, a damaged line elsewhere
    is a ValueError naming the file and line."""
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            if not isinstance(json.loads(line), dict):
                raise ValueError
        except ValueError:
            if all(not rest.strip() for rest in lines[number:]):
                continue  # the last row, cut by an interrupted write
            raise ValueError(
                f"{path}:{number}: not a metrics row ({line[:60]!r}); remove or fix the line"
            ) from None
        rows.append(line)
    return rows


def truncate_metrics(output_dir: str | os.PathLike, step: int) -> None:
    """Keep only the rows of steps <= ``step`` (and drop a line cut by a kill), atomically.
    A damaged row before the last is a ``ValueError`` naming the file and line."""
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return
    keep = [line for line in _rows(path) if json.loads(line).get("step", 0) <= step]
    with atomic_open(path, "w") as f:
        f.write("".join(r + "\n" for r in keep))


def repair_metrics(output_dir: str | os.PathLike) -> bool:
    """Drop a last row cut by a kill (the file does not end with a newline), so that the next
    appended row starts a line of its own; returns whether anything was dropped."""
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return False
    raw = path.read_bytes()
    if not raw or raw.endswith(b"\n"):
        return False
    rows = _rows(path)
    with atomic_open(path, "w") as f:
        f.write("".join(r + "\n" for r in rows))
    return True


def read_metrics(output_dir: str | os.PathLike) -> list[dict]:
    """The rows of ``output_dir/metrics.jsonl`` (empty when there is none); a last row cut by a
    kill is left out."""
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in _rows(path)]


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
