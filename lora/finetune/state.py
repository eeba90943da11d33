"""Training checkpoints: written atomically, read without unpickling.

A checkpoint is a directory ``checkpoint-<step>/`` holding

- ``adapter_model.safetensors`` + ``adapter_config.json``: the LoRA adapter (PEFT's format);
- ``training_state.safetensors``: the optimizer's tensors and the torch RNG states;
- ``trainer_state.json``: the step, the optimizer's hyper-parameters, Python's RNG state, and the
  configs the run was made with.

It is assembled in a hidden temporary directory (every file fsynced) and renamed into place in one
step, so a process killed at any moment leaves either no ``checkpoint-<step>`` or a complete one.
Replacing a checkpoint of the same step (a resumed run saving its last step again) and rotation
(``save_total_limit``) rename first and delete after; a kill between the renames leaves a complete
``.checkpoint-N.old`` or ``.checkpoint-N.*.tmp``, which :func:`recover_checkpoints` puts back.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .._io import atomic_save_safetensors, atomic_write_json, fsync_dir

__all__ = [
    "CHECKPOINT_RE",
    "write_checkpoint",
    "read_training_state",
    "latest_checkpoint",
    "list_checkpoints",
    "rotate_checkpoints",
    "recover_checkpoints",
    "is_complete",
    "crash_point",
    "optimizer_state_to_flat",
    "optimizer_state_from_flat",
]

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
TENSOR_FILE = "training_state.safetensors"


# --- optimizer and RNG state as tensors + JSON ----------------------------------------------------
def optimizer_state_to_flat(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into safetensors-ready tensors and a JSON-ready remainder."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, per_param in state["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_state_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith("optimizer."):
            continue
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, values in meta.get("scalars", {}).items():
        state.setdefault(int(index), {}).update(values)
    groups = []
    for group in meta["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda = sorted(
        (k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1])
    )
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


# --- writing and finding checkpoints --------------------------------------------------------------
def write_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    optimizer: torch.optim.Optimizer | None,
    write_adapter: Callable[[Path], None],
    extra_state: dict[str, Any],
) -> Path:
    """Write ``output_dir/checkpoint-<step>`` atomically and return its path.

    ``write_adapter(directory)`` writes the adapter files into the temporary directory.
    ``optimizer`` None (save_only_model): no training_state.safetensors, and no optimizer or RNG
    state in trainer_state.json: such a checkpoint cannot be resumed.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    final = output_dir / f"checkpoint-{step}"
    tmp = Path(tempfile.mkdtemp(prefix=f".checkpoint-{step}.", suffix=".tmp", dir=output_dir))
    try:
        write_adapter(tmp)
        if optimizer is None:
            atomic_write_json(tmp / STATE_FILE, {"step": step, **extra_state})
        else:
            opt_tensors, opt_meta = optimizer_state_to_flat(optimizer.state_dict())
            rng_tensors, rng_meta = rng_state()
            atomic_save_safetensors({**opt_tensors, **rng_tensors}, tmp / TENSOR_FILE)
            state = {"step": step, "optimizer": opt_meta, "rng": rng_meta, **extra_state}
            atomic_write_json(tmp / STATE_FILE, state)
        for f in tmp.iterdir():  # the adapter writer may not have fsynced
            _fsync_file(f)
        fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing was renamed yet: the old state is intact
        raise
    # From here on the temporary directory is a complete checkpoint: an interruption leaves it (or
    # the previous one as .old) on disk, and recover_checkpoints() at the next start puts it back.
    if final.exists():  # the same step written again (a resumed run): swap, then drop the old one
        old = output_dir / f".checkpoint-{step}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        crash_point("swap:old-moved")
        os.replace(tmp, final)
        fsync_dir(output_dir)
        crash_point("swap:new-placed")
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(output_dir)
    return final


def _fsync_file(path: Path) -> None:
    if path.is_file():
        with open(path, "rb") as f:
            os.fsync(f.fileno())


ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
COMPLETE_FILES = (STATE_FILE, TENSOR_FILE) + ADAPTER_FILES


def crash_point(name: str) -> None:
    """A named point between two renames, where a test can stop the process the way a kill does.

    With ``LORA_CRASH_AT=<name>`` in the environment the process exits at once (``os._exit(137)``,
    no cleanup, as after ``kill -9``); tests in the same process monkeypatch this function instead.
    Points: ``swap:old-moved``, ``swap:new-placed``, ``rotate:renamed``.
    """
    if os.environ.get("LORA_CRASH_AT") == name:
        os._exit(137)


def is_complete(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds every file of a checkpoint (each is written atomically, and the
    trainer state last, so a present file is a whole one). A save_only_model checkpoint has no
    training_state.safetensors; its trainer_state.json says so."""
    directory = Path(directory)
    if not directory.is_dir():
        return False
    if all((directory / f).is_file() for f in COMPLETE_FILES):
        return True
    return all((directory / f).is_file() for f in (STATE_FILE,) + ADAPTER_FILES) and _model_only(
        directory / STATE_FILE
    )


def _model_only(state_path: Path) -> bool:
    try:
        return json.loads(state_path.read_text(encoding="utf-8")).get("save_only_model") is True
    except (OSError, ValueError, AttributeError):
        return False


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``output_dir``, oldest first, as ``(step, path)``."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        m = CHECKPOINT_RE.match(p.name)
        if m and is_complete(p):
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


_LEFTOVER_RE = re.compile(r"^\.checkpoint-(\d+)\.(?:(old)|(deleting)|.+\.tmp)$")


def recover_checkpoints(output_dir: str | os.PathLike) -> list[str]:
    """Undo what a process killed inside :func:`write_checkpoint` or :func:`rotate_checkpoints`
    left behind; returns one line per action, for the log.

    Call it only while holding the output directory's lock (:mod:`lora.finetune.lock`): every
    leftover is then a dead process's. A complete ``.checkpoint-N.<x>.tmp`` (the new copy) or
    ``.checkpoint-N.old`` (the copy being replaced) becomes ``checkpoint-N`` when that name is
    missing; the newer ``.tmp`` wins. Everything else left over (incomplete temporaries, a
    ``.deleting`` rotation leftover, a superseded copy, atomic-write temporaries) is removed.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    actions: list[str] = []
    leftovers = []
    for p in output_dir.iterdir():
        m = _LEFTOVER_RE.match(p.name)
        if m:
            rank = 2 if m.group(3) else (1 if m.group(2) else 0)  # .tmp first, then .old
            leftovers.append((rank, int(m.group(1)), p))
        elif p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
            p.unlink(missing_ok=True)  # an atomic_open temporary (metrics, plot)
    for rank, step, p in sorted(leftovers, key=lambda t: (t[1], t[0])):
        final = output_dir / f"checkpoint-{step}"
        if rank < 2 and not final.exists() and is_complete(p):
            os.replace(p, final)
            fsync_dir(output_dir)
            actions.append(
                f"recovered {final.name} from {p.name} (a run was stopped while saving it)"
            )
        else:
            shutil.rmtree(p, ignore_errors=True)
    for name in os.listdir(output_dir):  # a checkpoint-N that lost files (older versions' rotation)
        path = output_dir / name
        if CHECKPOINT_RE.match(name) and path.is_dir() and not is_complete(path):
            lost = ", ".join(f for f in COMPLETE_FILES if not (path / f).is_file())
            actions.append(f"{name} is incomplete (missing {lost}): ignored")
    return actions


def rotate_checkpoints(output_dir: str | os.PathLike, keep: int | None) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (None: keep all); returns what was deleted.

    Each is first renamed to ``.checkpoint-N.deleting`` (atomic) and only then deleted, so a
    directory under a ``checkpoint-N`` name is always whole. Other processes' temporaries are never
    touched here (leftovers of dead runs go in :func:`recover_checkpoints`).
    """
    output_dir = Path(output_dir)
    if keep is None:
        return []
    found = list_checkpoints(output_dir)
    doomed = [p for _, p in found[: max(len(found) - keep, 0)]]
    for p in doomed:
        gone = p.with_name(f".{p.name}.deleting")
        shutil.rmtree(gone, ignore_errors=True)
        os.replace(p, gone)
        fsync_dir(output_dir)
        crash_point("rotate:renamed")
        shutil.rmtree(gone, ignore_errors=True)
    return doomed


def read_training_state(
    checkpoint: str | os.PathLike,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(trainer_state.json, tensors)`` of a checkpoint; ``ValueError`` naming the file if either is damaged."""
    checkpoint = Path(checkpoint)
    state_path, tensor_path = checkpoint / STATE_FILE, checkpoint / TENSOR_FILE
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{state_path}: cannot read the trainer state ({e})") from None
    try:
        tensors = load_file(str(tensor_path))
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{tensor_path}: cannot read the optimizer/RNG state ({e})") from None
    return state, tensors


def restore_optimizer_and_rng(optimizer: torch.optim.Optimizer, state: dict, tensors: dict) -> None:
    optimizer.load_state_dict(optimizer_state_from_flat(tensors, state["optimizer"]))
    set_rng_state(tensors, state["rng"])
