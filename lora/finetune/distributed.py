"""Training past one device: data-parallel and FSDP2-sharded runs under ``torchrun``.

    torchrun --standalone --nproc_per_node=2 -m lora.finetune --model M --data D --config C
    torchrun --standalone --nproc_per_node=8 -m lora.finetune ... --fsdp

The trainer holds a :class:`DistContext` and calls it at a few points; with one process (no
torchrun) every call is a no-op, so such a run is what it always was. Under torchrun:

- the process group comes from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*):
  gloo on CPU, nccl on CUDA (each rank on ``cuda:LOCAL_RANK``);
- a global micro-batch is ``per_device_train_batch_size × world_size`` sequences of the one
  (seed, step)-determined stream, and rank r takes the r-th slice of it (:meth:`DistContext.shard`);
- each rank divides its summed loss by the global number of counted labels, and the gradients of
  the trainable parameters are summed across ranks (:meth:`DistContext.reduce_gradients`, one
  all-reduce per optimizer step): the update is the one a single process with the whole global batch
  would make, up to floating-point summation order;
- only rank 0 writes (metrics, log lines, checkpoints, the adapter, the plot); every rank reads the
  checkpoint rank 0 chose when resuming.

With ``fsdp`` the frozen base is sharded by FSDP2 (``fully_shard``, one unit per decoder layer,
the embedding and lm_head one each, and the root; on CPU gathered as :func:`_gather_in_place`
says) and read from the checkpoint shard by shard (:func:`load_sharded_phi3`); the
LoRA parameters are left out of the sharding (``ignored_params``), so they stay whole on every
rank, train as above and save as usual. With ``quantize="nf4"`` the sharded base is the 4-bit one:
each rank holds and quantises whole blocks of 64 weights (see :func:`load_sharded_phi3`).
"""

from __future__ import annotations

import datetime
import os
import re
import resource
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._heap import trim_heap  # re-exported: it lived here first

__all__ = [
    "DistContext",
    "DistributedSetupError",
    "setup",
    "resolve_device",
    "global_batch_size",
    "shard_rows",
    "load_sharded_phi3",
    "peak_memory_mb",
    "trim_heap",
    "lost_rank_message",
    "TORCHRUN_STOP",
    "resume_comparable",
]


class DistributedSetupError(ValueError):
    """The launch cannot work (fsdp without torchrun, CUDA without a GPU, a batch that does not
    divide by the world size); the message names the setting and what was expected."""


@dataclass
class DistContext:
    """Where this process stands in the job. The default is the one-process run: no collectives.

    rank / world_size / local_rank: torchrun's RANK, WORLD_SIZE, LOCAL_RANK.
    device: where this rank's model and batches live. backend: "gloo", "nccl", or None (no group).
    fsdp: the frozen base is sharded (see :func:`load_sharded_phi3`).
    owns_group: this context created the process group, and :meth:`close` destroys it.
    meshes: the device meshes made on the group for this job (:func:`load_sharded_phi3`); each
    holds the group until :meth:`close` clears it.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    fsdp: bool = False
    owns_group: bool = False
    meshes: list = field(default_factory=list, repr=False, compare=False)

    @property
    def enabled(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the only writer."""
        return self.rank == 0

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")

    # --- collectives (no-ops without a group) -----------------------------------------------------
    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum of ``values`` over the ranks, in float64 (counts stay exact)."""
        if not self.enabled:
            return [float(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(t)
        return t.tolist()

    def reduce_gradients(self, params: Sequence[nn.Parameter]) -> None:
        """Sum the gradients of ``params`` across ranks, in place, in one flat all-reduce.

        Each rank's loss is already divided by the global label count, so the sum is the gradient of
        the global mean. A parameter without a gradient on some rank counts as zero there.
        """
        if not self.enabled or not params:
            return
        import torch.distributed as dist

        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads]).to(self._comm_device)
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(g).to(device=p.device, dtype=g.dtype)
            offset += n

    def broadcast_parameters(self, params: Sequence[nn.Parameter]) -> None:
        """Rank 0's values of ``params`` on every rank (the same seed gives the same LoRA init; this
        makes sure of it)."""
        if not self.enabled:
            return
        import torch.distributed as dist

        with torch.no_grad():
            for p in params:
                t = p.data.to(self._comm_device)
                dist.broadcast(t, src=0)
                if t is not p.data:
                    p.data.copy_(t)

    def broadcast_text(self, text: str | None) -> str | None:
        """Rank 0's ``text`` (a path, say) on every rank; sent as UTF-8 bytes, never pickled."""
        if not self.enabled:
            return text
        import torch.distributed as dist

        data = b"\xff" if text is None else text.encode("utf-8")  # 0xff never occurs in UTF-8
        size = torch.tensor([len(data)], dtype=torch.int64, device=self._comm_device)
        dist.broadcast(size, src=0)
        buf = torch.zeros(int(size), dtype=torch.uint8, device=self._comm_device)
        if self.is_main:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(buf, src=0)
        out = bytes(buf.cpu().tolist())
        return None if out == b"\xff" else out.decode("utf-8")

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if self.backend == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def close(self, free: bool = True) -> None:
        """Destroy the process group if this context made it, and (``free``) free it now, while
        the interpreter is whole: its backend's threads end here, not in the interpreter's
        teardown. ``free=False`` (a job that failed, and that torchrun may stop any moment) only
        destroys it, at once.

        ``destroy_process_group`` only unregisters the group; the C++ object, with gloo's worker
        threads, lives on while a Python object refers to it. Here that is the FSDP-sharded
        model (the caller drops it first), each device mesh made on the group (DTensor's sharding
        caches keep every mesh for the life of the process; :attr:`meshes` lets go of the group
        here) and ``torch.distributed.nn.functional``'s default arguments (:func:`setup` imports
        it before the group exists). Freed only in the interpreter's teardown, the group's
        destructor ran while Python was finalizing; a gloo worker thread still dropping the
        tensors of its last collective, whose Python objects it frees under the GIL, then met a
        finalizing interpreter, which ends such a thread (pthread_exit) from inside a noexcept
        destructor: std::terminate, "terminate called without an active exception", SIGABRT,
        after the job's work was saved. Freed here, the destructor waits for those threads
        while this one has released the GIL.
        """
        if self.enabled and self.owns_group:
            import gc

            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            if not free:
                return
            for mesh in self.meshes:
                registry = getattr(mesh, "_pg_registry", None)  # where a mesh holds its groups
                if isinstance(registry, dict):
                    registry.clear()
            self.meshes.clear()
            gc.collect()  # FSDP's state holds the group in reference cycles

    # --- data -------------------------------------------------------------------------------------
    def release_freed_memory(self) -> None:
        """After an optimizer step, under FSDP on CPU: give the C heap's free pages back to the
        system (:func:`trim_heap`). FSDP2 gathers and frees whole units in every forward and
        backward; on CPU that fragments glibc's heap a little more each step, and the resident set
        of a rank grew step after step (a 4-layer model, 2 gloo ranks, bf16: 657 → 1820 MiB over
        60 steps, against 656 → 916 MiB trimmed, with the same losses and no measurable cost).
        Data-parallel and one-process runs stay flat, and are left alone."""
        if self.fsdp and self.device.type == "cpu":
            trim_heap()

    def shard(self, ids: Sequence[int], per_device: int) -> list[int]:
        """This rank's slice of a global micro-batch ``ids`` (up to ``per_device × world_size``
        ids): ``ids[rank·per_device : (rank+1)·per_device]``; empty for a rank past a short last
        batch."""
        return list(ids[self.rank * per_device : (self.rank + 1) * per_device])

    def step_seed(self, seed: int, step: int) -> None:
        """With several ranks, seed the RNG (dropout) from (seed, step, rank) at each optimizer
        step: ranks draw different masks, and a resumed run draws what the uninterrupted one drew.
        One process keeps its single stream (restored from the checkpoint)."""
        if self.world_size > 1:
            torch.manual_seed(((seed * 1_000_003 + step) * 1_009 + self.rank) % 2**63)

    # --- metrics ----------------------------------------------------------------------------------
    def memory_row(self, model: nn.Module) -> dict:
        """The per-rank figures of a metrics row (a collective): ``world_size``; ``memory_mb``, each
        rank's peak memory (:func:`peak_memory_mb`); ``params_mb``, the weight bytes each rank
        holds between steps (:func:`parameter_mb`: 4-bit codes and scales included; its shards
        under FSDP), in MiB."""
        peak, held = peak_memory_mb(self.device), parameter_mb(model)
        if not self.enabled:
            return {"world_size": 1, "memory_mb": [peak], "params_mb": [held]}
        import torch.distributed as dist

        t = torch.zeros(2, self.world_size, dtype=torch.float64, device=self._comm_device)
        t[0, self.rank], t[1, self.rank] = peak, held
        dist.all_reduce(t)
        return {
            "world_size": self.world_size,
            "memory_mb": t[0].tolist(),
            "params_mb": t[1].tolist(),
        }


def parameter_mb(model: nn.Module) -> float:
    """MiB of the weights this process holds: the parameters, and the buffers of each 4-bit base
    weight (an NF4Weight keeps its packed codes and scales as buffers, not parameters); of a
    sharded (DTensor) one, the local shard."""
    from ..quant import is_quantized

    tensors = {id(p): p for p in model.parameters()}
    for m in model.modules():
        if is_quantized(m):
            tensors.update((id(b), b) for b in m.buffers() if b is not None)
    total = 0
    for t in tensors.values():
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total / 2**20


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory in MiB: CUDA's max_memory_allocated on a GPU; else the peak
    resident set: Linux's VmHWM (of this program only: ru_maxrss would carry over the peak of a
    parent that forked it), or ru_maxrss elsewhere (KiB; bytes on macOS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def lost_rank_message(error: BaseException, output_dir: str | os.PathLike | None) -> str | None:
    """The one-line report for a collective that failed because another rank is gone, or None when
    ``error`` is not that (or this is not a torchrun job).

    A rank that dies (killed, out of memory, an exception) closes its connections; the ranks waiting
    for it in a collective get an error at once (gloo; nccl: its watchdog), and torchrun stops the
    rest (SIGTERM, see :data:`TORCHRUN_STOP`) and prints which rank failed first.
    """
    if "WORLD_SIZE" not in os.environ:
        return None
    import torch.distributed as dist

    text = str(error)
    known = (
        "Connection closed by peer",
        "Connection reset by peer",
        "Broken pipe",
        "NCCL",
        "gloo",
        "Socket Timeout",
        "timed out",
        "ProcessGroup",
    )
    if not isinstance(error, getattr(dist, "DistError", ())) and not any(k in text for k in known):
        return None
    first = text.strip().splitlines()[0][:200] if text.strip() else type(error).__name__
    return (
        f"another rank of this job stopped, so rank {os.environ.get('RANK', '?')} cannot go on "
        f"({type(error).__name__}: {first}). torchrun's summary names the rank that failed first. "
        + _checkpoint_hint(output_dir)
    )


# Appended to the interrupt message of a rank that torchrun stopped (SIGTERM).
TORCHRUN_STOP = (
    " (under torchrun a SIGTERM means another rank failed, and torchrun stops the "
    "rest: its summary below names the rank that failed first, with its exit code)"
)


def _checkpoint_hint(output_dir: str | os.PathLike | None) -> str:
    from .state import latest_checkpoint

    last = latest_checkpoint(output_dir) if output_dir is not None else None
    if last is None:
        return "No checkpoint was written yet."
    return (
        f"The last complete checkpoint is {last}; continue with --resume (the same global batch, "
        "any number of processes)."
    )


def resolve_device(request: str, local_rank: int = 0) -> torch.device:
    """``device`` ("auto", "cpu", "cuda", "cuda:N") -> a torch.device. "auto": CUDA when there is a
    GPU, else CPU. Under torchrun "cuda" means ``cuda:LOCAL_RANK``.

    Raises DistributedSetupError: CUDA asked for with no GPU visible, or an unknown value.
    """
    if not isinstance(request, str) or not (
        request in ("auto", "cpu", "cuda") or request.startswith("cuda:")
    ):
        raise DistributedSetupError(
            f"training_config device={request!r}: expected 'auto', 'cpu', 'cuda' or 'cuda:N'"
        )
    if request == "auto":
        request = "cuda" if torch.cuda.is_available() else "cpu"
    if request == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DistributedSetupError(
            f"device={request!r}: CUDA was asked for but torch sees no GPU "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
            "use --device cpu, or install a CUDA build of torch on a machine with a GPU"
        )
    index = local_rank if request == "cuda" else int(request.split(":", 1)[1])
    if index >= torch.cuda.device_count():
        raise DistributedSetupError(
            f"device={request!r} (local rank {local_rank}): "
            f"only {torch.cuda.device_count()} GPU(s) visible; "
            "start at most that many processes per node (torchrun --nproc_per_node)"
        )
    return torch.device("cuda", index)


def _torchrun_env() -> tuple[int, int, int] | None:
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        return (
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("LOCAL_RANK", 0)),
        )
    except ValueError:
        raise DistributedSetupError(
            f"RANK={os.environ['RANK']!r} WORLD_SIZE={os.environ['WORLD_SIZE']!r}: "
            "expected integers "
            "(as torchrun sets them)"
        ) from None


def setup(device: str = "auto", fsdp: bool = False, timeout_s: float | None = None) -> DistContext:
    """The context of this process, joining torchrun's process group if launched by torchrun.

    Without torchrun (no RANK/WORLD_SIZE in the environment): the one-process context on ``device``.
    Under torchrun: init_process_group with gloo (CPU) or nccl (CUDA), unless the caller already
    made a group, which is then used as it is. ``timeout_s``: the collective timeout (default:
    torch's, or the LORA_DIST_TIMEOUT environment variable, seconds).

    Raises DistributedSetupError: ``fsdp`` without torchrun; CUDA asked for with no GPU.
    """
    import torch.distributed as dist

    env = _torchrun_env()
    if env is None and not dist.is_initialized():
        if fsdp:
            raise DistributedSetupError(
                "fsdp=true (--fsdp) shards the model across processes, but this is a single "
                "process: launch it with torchrun, e.g. "
                "`torchrun --standalone --nproc_per_node=2 -m lora.finetune "
                "... --fsdp` (one process per GPU)"
            )
        return DistContext(device=resolve_device(device))
    rank, world, local = env if env is not None else (dist.get_rank(), dist.get_world_size(), 0)
    dev = resolve_device(device, local)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = (
            timeout_s
            if timeout_s is not None
            else float(os.environ.get("LORA_DIST_TIMEOUT", 0) or 0)
        )
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        # Imported once the group exists (torch._dynamo's import does that, lazily), its
        # functions take the group as a default argument and hold it until the interpreter's
        # teardown, where freeing it can abort the process (see DistContext.close).
        import torch.distributed.nn as _dist_nn  # noqa: F401  (binds no local `torch`)

        dist.init_process_group(
            backend=backend,
            timeout=datetime.timedelta(seconds=timeout) if timeout > 0 else None,
            device_id=dev if dev.type == "cuda" else None,
        )
        owns = True
    backend = dist.get_backend()
    if dev.type == "cuda" and backend != "nccl" or dev.type == "cpu" and backend == "nccl":
        raise DistributedSetupError(
            f"device {dev} with a {backend} process group: expected gloo on CPU, nccl on CUDA"
        )
    return DistContext(
        rank=rank,
        world_size=world,
        local_rank=local,
        device=dev,
        backend=backend,
        fsdp=fsdp,
        owns_group=owns,
    )


def global_batch_size(
    per_device: int, world_size: int, global_batch: int | None = None
) -> tuple[int, int]:
    """``(global, per_device)`` sequences per micro-batch.

    ``global_batch`` None: ``per_device × world_size``. Given: it must divide by the world size, and
    ``per_device`` becomes ``global_batch / world_size``.

    Raises DistributedSetupError: a global batch that does not divide by the world size.
    """
    if global_batch is None:
        return per_device * world_size, per_device
    if global_batch % world_size:
        raise DistributedSetupError(
            f"global_train_batch_size={global_batch} does not divide by the world size "
            f"{world_size}: expected a multiple of {world_size} (or run with a number of "
            f"processes that divides {global_batch})"
        )
    return global_batch, global_batch // world_size


def resume_comparable(
    training: dict | None, global_batch: int, same_world_size: bool = True
) -> dict | None:
    """A training_config dict as a resume check compares it: without ``device`` and ``fsdp``
    (they change where the numbers are computed, not which) and ``global_train_batch_size`` (the
    trainer compares the global batch itself); and, when the world size changed, without
    ``per_device_train_batch_size``, which then has to change for the global batch to stay."""
    if training is None:
        return None
    drop = {"global_train_batch_size", "device", "fsdp"}
    if not same_world_size:
        drop.add("per_device_train_batch_size")
    return {k: v for k, v in training.items() if k not in drop}


# The parts of a state-dict key that modules_to_save adds (PEFT's names) to the module's own.
_SAVED_PARTS = re.compile(r"\.original_module(?=\.)|\.modules_to_save\.[^.]+(?=\.)")


# --- FSDP2 ----------------------------------------------------------------------------------------
def _separate_originals(model: nn.Module) -> list[nn.Module]:
    """The frozen originals of ``model``'s modules_to_save wrappers that can be FSDP units of their
    own: all but those with a parameter that a module outside them holds too (a tied lm_head's
    original holds the embedding's weight: it stays in the unit of its partner)."""
    from ..layers.saved import saved_modules

    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    out = []
    for _, wrapper in saved_modules(model):
        original = wrapper.original_module
        inside: dict[int, int] = {}
        for _, p in original.named_parameters(remove_duplicate=False):
            inside[id(p)] = inside.get(id(p), 0) + 1
        if inside and all(uses[i] == n for i, n in inside.items()):
            out.append(original)
    return out


class _BroadcastAllGather:
    """FSDP2's all-gather of a unit on gloo, as one broadcast per rank into the unit's own flat
    buffer (``output``: rank r's shard at chunk r, where FSDP has copied this rank's in).

    gloo's all-gather (``all_gather_single``, what FSDP2 calls) gathers into a staging tensor of
    the whole output and then copies it out: a second copy of the unit (216 MiB for a Phi-3-mini
    decoder layer in bf16) at every gather, forward and backward, on top of the two FSDP holds.
    A CPU broadcast reads and writes its tensor in place. The bytes are the same; only copies.
    FSDP2's ``AllGather`` interface (``set_custom_all_gather``), set by :func:`_gather_in_place`.
    """

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def __call__(self, output_tensor, input_tensor, group, async_op: bool = False):
        import torch.distributed as dist

        for src, chunk in enumerate(output_tensor.chunk(dist.get_world_size(group))):
            dist.broadcast(chunk, group=group, group_src=src)
        return None  # done: FSDP then waits on nothing (as for a synchronous all-gather)


def _gather_in_place(model: nn.Module) -> None:
    """On CPU (gloo), for every FSDP unit of ``model``: gather with :class:`_BroadcastAllGather`,
    free the gather buffer and trim the heap as soon as the unit is gathered
    (:func:`_free_before_compute`), and prefetch nothing in backward.

    A gloo all-gather blocks the rank until it is done, so prefetching the next unit in backward
    (FSDP2's default) overlaps nothing: it only holds that unit's gathered buffer while the
    current one computes. A unit that lists itself as the one to prefetch turns that off (FSDP2
    has no other switch: an empty list means its default); itself is already gathered when the
    prefetch comes, so it is a no-op. The values gathered are the same bytes: losses and adapter
    are bitwise those of the default FSDP2 path.

    Each decoder layer, a unit, then trims the heap before it computes: a Phi-3 model's own trims
    between layers under gradient checkpointing (``Phi3Model.release_heap_every``) would repeat
    them back to back, and step aside (``layers_release_heap``); its trim before the loss stays."""
    from torch.distributed.fsdp import FSDPModule

    comm = _BroadcastAllGather()  # FSDP2 calls allocate and __call__ (it checks no base class)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_custom_all_gather(comm)  # type: ignore[arg-type]
            module.set_modules_to_backward_prefetch([module])
            # after FSDP's own pre-forward hook (it prepends its), once the unit is gathered
            module.register_forward_pre_hook(_free_before_compute)
    for module in model.modules():
        if hasattr(module, "layers_release_heap"):  # Phi3Model: its layers trim (above)
            module.layers_release_heap = True


def _free_before_compute(module: nn.Module, args) -> None:
    """Once FSDP has gathered a unit for its forward (or its recomputation in backward): free
    the flat buffer it was gathered into, and give the C heap's free pages back (:func:`trim_heap`).

    The buffer: its contents are copied out into the unit's parameters. In forward FSDP2 keeps it
    until the next unit's gather is copied out, to overlap a CUDA copy with the next all-gather; a
    CPU gather blocks, so there is nothing to overlap, and a rank held three units at once there
    (this buffer, the next unit's, and its parameters: torch 2.13 frees the kept one only after the
    next copy-out). Freed here, a rank holds two at most.

    The heap: the activations and temporaries of one unit's compute are freed before the next
    unit's; trimmed only after the optimizer step, their free pages stayed resident through the
    step (about 100 MiB of a rank's peak at Phi-3-mini's width), at no measurable cost in time."""
    state = module._get_fsdp_state()  # type: ignore[operator]
    comm_ctx = getattr(state, "_comm_ctx", None)
    if getattr(comm_ctx, "all_gather_state", None) is not None:
        comm_ctx.all_gather_state = None  # type: ignore[union-attr]
    trim_heap()


def shard_rows(rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of a tensor's dim 0 that rank ``rank`` holds under FSDP2's
    Shard(0) (``torch.chunk`` semantics: chunks of ceil(rows / world_size), the last ones shorter
    or empty)."""
    chunk = -(-rows // world_size) if rows else 0
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


def load_sharded_phi3(
    model_dir: str | os.PathLike,
    peft,
    dtype: torch.dtype,
    ctx: DistContext,
    quantize: str | None = None,
) -> nn.Module:
    """A Phi-3 checkpoint, LoRA-injected and FSDP2-sharded, read so that no rank holds it whole.

    The model is built and injected on the meta device; each decoder layer becomes one
    ``fully_shard`` unit, the embedding and lm_head one each (tied, they stay in the root), the
    frozen original of each modules_to_save wrapper one of its own (it never runs while its copy
    does, so it is never gathered; not a tied original, which stays with its partner), and the
    root (the final norm) another, with every trainable parameter (LoRA, modules_to_save copies,
    trained biases) in ``ignored_params``. On CPU the units gather in place, one at a time
    (:func:`_gather_in_place`). Then each rank reads from the safetensors files, opened tensor by
    tensor (the mapped pages it read leave its resident set each time), only its own rows of each
    frozen tensor (``get_slice``), and the LoRA parameters are initialised from the RNG state the caller left,
    drawn in the order :func:`lora.inject` draws them: a seed gives the same adapter as the
    one-process run. ``peft``: the :class:`lora.LoRAConfig` to inject.

    ``quantize="nf4"``: the Linear weights :func:`lora.quantize` would quantise are 4-bit, in the
    layout FSDP2 shards (:meth:`lora.quant.NF4Weight.make_shardable`: one row per block of 64
    weights, so a shard is whole blocks); each rank reads the rows that hold its blocks,
    quantises them (:func:`lora.quant.quantize_blocks`), and the ranks all-gather the block
    absmax (4 bytes per 64 weights) to double-quantise the scales as one process does. So each
    rank holds bitwise its slice of what ``from_pretrained(..., quantize="nf4")`` holds whole.
    A modules_to_save copy is not 4-bit: its weights (whole on every rank, trainable) are the
    dequantised quantisation of the whole checkpoint tensor, bitwise what one process's copy
    starts from (``ModulesToSaveWrapper.add_copy`` over a 4-bit original).

    Raises DistributedSetupError when ``ctx`` has no process group; CheckpointError /
    FileNotFoundError as :meth:`Phi3ForCausalLM.from_pretrained`.
    """
    from safetensors import safe_open
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from ..layers.base import LoRALayer
    from ..models import Phi3Config, Phi3ForCausalLM
    from ..models import checkpoint as ckpt
    from ..quant import quantize_shardable
    from ..surgery import inject

    if not ctx.enabled:
        raise DistributedSetupError("load_sharded_phi3: no process group; launch with torchrun")
    path = Path(model_dir)
    config = Phi3Config.from_json_file(ckpt.require_file(path, ckpt.CONFIG_NAME))
    rng = torch.get_rng_state()
    with torch.device("meta"):
        model = Phi3ForCausalLM(config)
    model.to(dtype)
    inject(model, peft)
    nf4 = quantize_shardable(model, quantize) if quantize is not None else {}
    # checkpoint name -> the 4-bit weights read from it. (A modules_to_save copy is never 4-bit:
    # it trains in full, from the dequantised values of its original's 4-bit weight: _read_decoded.)
    nf4_by_name: dict[str, list] = {}
    for module_name, weight in nf4.items():
        nf4_by_name.setdefault(_SAVED_PARTS.sub("", f"{module_name}.weight"), []).append(weight)
    nf4_prefixes = tuple(f"{module_name}.weight." for module_name in nf4)
    trainable = {p for p in model.parameters() if p.requires_grad}
    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    ctx.meshes.append(mesh)  # for DistContext.close to free the group
    # A modules_to_save wrapper runs its copy (trainable, ignored: whole), never its frozen
    # original, which is then a unit of its own: it is gathered only if it runs (lora.disabled),
    # not in every forward and backward of the unit around it (a whole decoder layer gathered for
    # nothing, per step, when the layer is the saved module).
    for unit in _separate_originals(model):
        fully_shard(unit, mesh=mesh, ignored_params=trainable)
    units = list(model.model.layers)
    if not config.tie_word_embeddings:
        # Their own units too: the root would otherwise hold both whole for the entire forward.
        units += [model.model.embed_tokens, model.lm_head]
    for unit in units:
        fully_shard(unit, mesh=mesh, ignored_params=trainable)
    fully_shard(model, mesh=mesh, ignored_params=trainable)
    if ctx.device.type == "cpu":
        _gather_in_place(model)
    model.to_empty(device=ctx.device)
    tied_and_whole = config.tie_word_embeddings and isinstance(model.lm_head, nn.Linear)
    if tied_and_whole and not hasattr(model.model.embed_tokens.weight, "to_local"):
        # a trained, so unsharded, tied matrix: to_empty gave lm_head a copy of its own
        model.tie_weights()

    lora_ids = {
        id(p)
        for m in model.modules()
        if isinstance(m, LoRALayer)
        for n, p in m.named_parameters(recurse=False)
        if n.startswith("lora_")
    }
    # Everything but the LoRA parameters comes from the checkpoint, sharded (DTensor) or whole
    # (modules_to_save copies, trained biases: ignored by FSDP), by the name it has there: a LoRA
    # layer's base weight keeps its key; a modules_to_save wrapper's original and copy both read
    # the module's own tensor; a tied lm_head reads the embedding.
    expected: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in lora_ids or key.startswith(nf4_prefixes):  # (4-bit: read below)
            continue
        name = _SAVED_PARTS.sub("", key)
        if config.tie_word_embeddings and name == "lm_head.weight":
            name = "model.embed_tokens.weight"
        expected.setdefault(name, []).append((key, tensor))
    found: set[str] = set()
    problems: list[str] = []
    with torch.no_grad():
        for file in ckpt.weight_files(path):
            with safe_open(file, framework="pt", device="cpu") as f:
                names = list(f.keys())
            for name in names:
                # A file opened for each tensor: safetensors maps the file, and the pages a rank
                # reads count in its resident set until the file is closed (with one 5 GB file
                # held open, 2.5 GB of them at Phi-3-mini's size, on top of the shards read).
                with safe_open(file, framework="pt", device="cpu") as f:
                    if name.endswith("rotary_emb.inv_freq") or (
                        config.tie_word_embeddings and name == "lm_head.weight"
                    ):
                        continue
                    sl = f.get_slice(name)
                    shape = tuple(sl.get_shape())
                    if name in nf4_by_name:
                        problems += _read_nf4(name, sl, shape, nf4_by_name[name], dtype, ctx)
                        for key, target in expected.get(name, []):  # a modules_to_save copy
                            problems += _read_decoded(key, sl, shape, target, nf4_by_name[name][0])
                        found.add(name)
                        continue
                    if name not in expected:
                        problems.append(f"unexpected tensor {name} (in {file.name})")
                        continue
                    for key, target in expected[name]:
                        if shape != tuple(target.shape):
                            problems.append(
                                f"{key}: checkpoint {shape}, model {tuple(target.shape)}"
                            )
                            continue
                        if hasattr(target, "to_local"):  # a DTensor: read only this rank's rows
                            local = target.to_local()
                            start, stop = shard_rows(shape[0], ctx.world_size, ctx.rank)
                            part = sl[start:stop] if stop > start else torch.empty((0, *shape[1:]))
                        else:
                            local, part = target, sl[:]
                        local.copy_(part.to(local.dtype))
                    found.add(name)
    problems += [f"missing tensor {m}" for m in sorted((set(expected) | set(nf4_by_name)) - found)]
    if problems:
        more = f" ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ckpt.CheckpointError(
            f"checkpoint {str(path)!r} does not match {type(model).__name__}: "
            + "; ".join(problems[:20])
            + more
        )
    model.model.rotary_emb.reset_buffers(ctx.device)
    # The LoRA parameters were made on meta (no values, no RNG drawn): draw them as inject would.
    torch.set_rng_state(rng)
    for module in model.modules():
        if isinstance(module, LoRALayer) and module.has_adapter:
            module.reset_lora_parameters()
            if not peft.init_lora_weights:
                module.randomize_lora_parameters()
    return model.eval()


def _read_decoded(key: str, sl, shape: tuple, target: torch.Tensor, like) -> list[str]:
    """Fill ``target``, the whole (FSDP-ignored) trainable weight of a modules_to_save copy, with
    the dequantised 4-bit quantisation of checkpoint tensor ``sl`` as one process's copy starts
    from it (``from_pretrained(..., quantize="nf4")`` quantises the whole tensor, read in the
    model's dtype; the copy dequantises that to its compute dtype): bitwise the same values.
    ``like``: the original's 4-bit weight (block sizes). Returns the problems found (none: [])."""
    from ..quant import NF4Weight

    if shape != tuple(target.shape):
        return [f"{key}: checkpoint {shape}, model {tuple(target.shape)}"]
    whole = sl[:].to(device=target.device, dtype=target.dtype)
    nf4 = NF4Weight.from_float(
        whole, block_size=like.block_size, scale_block_size=like.scale_block_size
    )
    target.copy_(nf4.dequantize(target.dtype))
    return []


def _read_nf4(name: str, sl, shape: tuple, weights: list, dtype: torch.dtype, ctx) -> list[str]:
    """Fill this rank's blocks of the 4-bit ``weights`` (FSDP-sharded, :meth:`make_shardable`
    layout) from the checkpoint slice ``sl`` of tensor ``name``; a collective (every rank calls
    it for every 4-bit tensor, in the same order). Returns the problems found (none: [])."""
    import torch.distributed as dist

    from ..quant import quantize_blocks, quantize_scales

    w0 = weights[0]
    if shape != tuple(w0.shape):
        return [f"{name}: checkpoint {shape}, model {tuple(w0.shape)}"]
    rows, cols = shape
    n, bs = rows * cols, w0.block_size
    n_blocks = -(-n // bs)
    b0, b1 = shard_rows(n_blocks, ctx.world_size, ctx.rank)
    e0, e1 = b0 * bs, min(b1 * bs, n)  # this rank's elements of the flattened weight
    if e1 > e0:
        r0, r1 = e0 // cols, -(-e1 // cols)  # the rows that hold them
        part = sl[r0:r1].to(device=ctx.device, dtype=dtype).reshape(-1)
        packed, scales = quantize_blocks(part[e0 - r0 * cols : e1 - r0 * cols], bs)
    else:
        packed = torch.empty(0, dtype=torch.uint8, device=ctx.device)
        scales = torch.empty(0, dtype=torch.float32, device=ctx.device)
    # Double quantisation needs every block's scale: gather them (the ranks' blocks are
    # consecutive chunks of ceil(n_blocks / world) blocks, the last ones shorter or empty).
    chunk = -(-n_blocks // ctx.world_size)
    mine = torch.zeros(chunk, dtype=torch.float32, device=ctx._comm_device)
    mine[: scales.numel()] = scales.to(mine.device)
    parts = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(parts, mine)
    every = torch.cat(parts)[:n_blocks].to(ctx.device)
    codes, group_absmax, mean = quantize_scales(every, w0.scale_block_size)
    for w in weights:
        local_packed, local_codes = w.packed.to_local(), w.scale_codes.to_local()
        if local_packed.shape[0] != b1 - b0 or local_codes.shape[0] != b1 - b0:
            raise DistributedSetupError(
                f"{name}: FSDP holds blocks {tuple(local_packed.shape)} / "
                f"{tuple(local_codes.shape)} on rank {ctx.rank}; expected {b1 - b0} blocks "
                f"({b0}:{b1} of {n_blocks}, torch.chunk's split)"
            )
        local_packed.copy_(packed.view(-1, bs // 2))
        local_codes.copy_(codes[b0:b1])
        w.scale_absmax.copy_(group_absmax)
        w.scale_mean.copy_(mean)
    return []
