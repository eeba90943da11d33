"""Checkpoint directories in transformers' layout, read and written without pickle.

A directory holds ``config.json`` and its weights as safetensors: either one ``model.safetensors``,
or shards ``model-00001-of-0000N.safetensors`` listed in ``model.safetensors.index.json``
(``{"metadata": {"total_size": bytes, ...}, "weight_map": {tensor name: shard file}}``). When both a
single file and an index are present, the single file wins, as in transformers.

Loading assigns tensors one at a time into a module built on the meta device, so peak memory is
about one copy of the weights; every name and shape is checked from the file headers first, before
any weight is read. Writing goes through ``lora._io`` so each file appears atomically.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from lora._io import atomic_save_safetensors, atomic_write_json, fsync_dir
from lora.checks import listing

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "WEIGHTS_INDEX_NAME",
    "CheckpointError",
    "require_file",
    "parse_size",
    "weight_files",
    "load_into",
    "save_state_dict",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


class CheckpointError(ValueError):
    """A checkpoint's tensors do not match the model: the message names every missing, unexpected or
    misshapen tensor."""


def require_file(directory: str | os.PathLike, name: str) -> Path:
    """``directory / name``, or FileNotFoundError naming both."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"checkpoint path={str(directory)!r} is not a directory; expected a checkpoint directory"
        )
    path = directory / name
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint directory {str(directory)!r} has no {name}")
    return path


def parse_size(size: int | str) -> int:
    """A shard size in bytes: an int, or a string such as "2GB" (10^9), "500MB", "2GiB" (2^30), "4096"."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    elif isinstance(size, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", size.upper())
        if match is None or (match.group(2) or "B") not in _UNITS:
            raise ValueError(
                f"max_shard_size={size!r}; expected bytes as an int or a string like '2GB', '500MB', '2GiB'"
            )
        value = int(float(match.group(1)) * _UNITS[match.group(2) or "B"])
    else:
        raise ValueError(
            f"max_shard_size={size!r}; expected bytes as an int or a string like '2GB'"
        )
    if value <= 0:
        raise ValueError(f"max_shard_size={size!r}; expected a positive size")
    return value


def weight_files(directory: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint directory, in shard order.

    Raises:
        FileNotFoundError: neither model.safetensors nor model.safetensors.index.json is there, or
            the index names a shard that is missing.
    """
    directory = Path(directory)
    single = directory / WEIGHTS_NAME
    if single.is_file():
        return [single]
    index = directory / WEIGHTS_INDEX_NAME
    if not index.is_file():
        found = sorted(p.name for p in directory.glob("*.bin")) if directory.is_dir() else []
        hint = (
            f" (found {found}: pickle files are never read; convert them to safetensors)"
            if found
            else ""
        )
        raise FileNotFoundError(
            f"checkpoint directory {str(directory)!r} has neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME}{hint}"
        )
    try:
        body = json.loads(index.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        why = f"{type(e).__name__}: {str(e)[:200]}"
        raise CheckpointError(f"{index}: not a JSON file ({why})") from None
    weight_map = body.get("weight_map") if isinstance(body, dict) else None
    names_ok = isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
    if not names_ok or not weight_map:
        raise FileNotFoundError(
            f"{index} has no 'weight_map'; expected {{tensor name: shard file}}"
        )
    files = [directory / name for name in sorted(set(weight_map.values()))]
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(
                f"{WEIGHTS_INDEX_NAME} in {str(directory)!r} lists shard {path.name!r}, which does not exist"
            )
    return files


def tensor_shapes(directory: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """``{tensor name: shape}`` from the safetensors headers of a checkpoint (no weight is read).

    Raises:
        FileNotFoundError: see :func:`weight_files`.
        CheckpointError: a file that is not a readable safetensors file (truncated, random bytes),
            named.
    """
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in weight_files(directory):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"{path}: not a valid safetensors file, truncated or corrupt ({e})"
            ) from None
    return shapes


def _describe(problems: list[str], what: str, limit: int = 20) -> str:
    return f"{len(problems)} {what}: {listing(problems, limit, ', ', more_sep=' ')}"


def load_into(
    module: nn.Module,
    directory: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
    skip: Iterable[str] = (),
    ignore_unexpected: Iterable[str] = (),
    assign: Callable[[nn.Module, str, Tensor], bool] | None = None,
) -> None:
    """Fill ``module``'s parameters and persistent buffers from a checkpoint directory, tensor by tensor.

    Each tensor is read onto ``device``, cast to ``dtype`` if floating (None: as stored), and assigned
    in place of the module's (typically meta) tensor; parameters keep their ``requires_grad``.
    Non-persistent buffers are left as they are: the caller computes them.

    Args:
        skip: state-dict names neither required nor loaded (e.g. a tied lm_head.weight).
        ignore_unexpected: regular expressions; checkpoint names matching one are passed over.
        assign: called as ``assign(module, name, tensor)`` for each tensor read (after the cast); when
            it returns True it has placed the tensor itself, else the default assignment runs.
            ``lora.quant.quantizing_assign`` quantises weights here, as they are read.

    Raises:
        FileNotFoundError: see ``weight_files``.
        CheckpointError: missing, unexpected or misshapen tensors, all named; raised before any weight
            is read, so nothing is half loaded.
    """
    from safetensors import safe_open

    skip = set(skip)
    ignore = [re.compile(p) for p in ignore_unexpected]
    expected = {
        name: t for name, t in module.state_dict(keep_vars=True).items() if name not in skip
    }
    files = weight_files(directory)

    source: dict[str, Path] = {}
    unexpected: list[str] = []
    misshapen: list[str] = []
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                if name in skip or any(p.search(name) for p in ignore):
                    continue
                if name not in expected:
                    unexpected.append(f"{name} (in {path.name})")
                    continue
                shape = tuple(f.get_slice(name).get_shape())
                if shape != tuple(expected[name].shape):
                    misshapen.append(
                        f"{name}: checkpoint {shape}, model {tuple(expected[name].shape)}"
                    )
                source[name] = path
    missing = sorted(set(expected) - set(source))
    if missing or unexpected or misshapen:
        parts = []
        if missing:
            parts.append(_describe(missing, "missing tensor(s)"))
        if unexpected:
            parts.append(_describe(unexpected, "unexpected tensor(s)"))
        if misshapen:
            parts.append(_describe(misshapen, "tensor(s) of the wrong shape"))
        raise CheckpointError(
            f"checkpoint {str(directory)!r} does not match {type(module).__name__}: "
            + "; ".join(parts)
        )

    device = torch.device(device)
    for path in files:
        with safe_open(path, framework="pt", device=str(device)) as f:
            for name in f.keys():
                if source.get(name) != path:
                    continue
                tensor = f.get_tensor(name)
                if dtype is not None and tensor.is_floating_point():
                    tensor = tensor.to(dtype)
                if assign is None or not assign(module, name, tensor):
                    _assign(module, name, tensor)
                del tensor  # before the next read: one tensor in flight at a time


def _assign(module: nn.Module, name: str, tensor: Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name)
    if leaf in owner._parameters:
        requires_grad = owner._parameters[leaf].requires_grad  # type: ignore[union-attr]
        setattr(owner, leaf, nn.Parameter(tensor, requires_grad=requires_grad))
    else:
        setattr(owner, leaf, tensor)


def save_state_dict(
    state_dict: Mapping[str, Tensor],
    directory: str | os.PathLike,
    max_shard_size: int | str = "5GB",
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write tensors as safetensors in transformers' layout; returns the files written.

    Tensors go into shards in state-dict order, a new shard starting when the next tensor would take
    the current one past ``max_shard_size`` (a tensor larger than that gets a shard of its own). One
    shard is written as model.safetensors; several as model-0000i-of-0000n.safetensors plus the index.
    Each file is written atomically; afterwards, weight files and an index left by an earlier save
    that this one does not use are removed. Files carry the safetensors metadata {"format": "pt"}.

    Raises:
        ValueError: an empty state dict, or a bad max_shard_size.
    """
    if not state_dict:
        raise ValueError("save_state_dict: state_dict is empty; expected at least one tensor")
    limit = parse_size(max_shard_size)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    shards: list[list[str]] = [[]]
    shard_bytes = 0
    for name, tensor in state_dict.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + nbytes > limit:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(name)
        shard_bytes += nbytes

    n = len(shards)
    names = (
        [WEIGHTS_NAME]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )
    file_metadata = {"format": "pt", **(metadata or {})}
    written = []
    for file_name, keys in zip(names, shards, strict=True):
        path = directory / file_name
        atomic_save_safetensors({k: state_dict[k] for k in keys}, path, metadata=file_metadata)
        written.append(path)
    if n > 1:
        total_size = sum(t.numel() * t.element_size() for t in state_dict.values())
        total_parameters = sum(t.numel() for t in state_dict.values())
        weight_map = {
            k: file_name for file_name, keys in zip(names, shards, strict=True) for k in keys
        }
        atomic_write_json(
            directory / WEIGHTS_INDEX_NAME,
            {
                "metadata": {"total_parameters": total_parameters, "total_size": total_size},
                "weight_map": dict(sorted(weight_map.items())),
            },
        )

    # Leftovers of an earlier save would be read instead of (model.safetensors) or beside (shards) ours.
    for path in directory.iterdir():
        stale_weights = (
            path.name == WEIGHTS_NAME or _SHARD_NAME.match(path.name)
        ) and path.name not in names
        stale_index = path.name == WEIGHTS_INDEX_NAME and n == 1
        if stale_weights or stale_index:
            path.unlink()
    fsync_dir(directory)
    return written
