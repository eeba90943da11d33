"""One rank of a test job, launched as

    torchrun ... tests/dist_worker.py [--audit DIR] [--die-rank R --die-at I] ... :: ARGS

Runs ``lora-finetune ARGS`` (lora.finetune.__main__.main) in this torchrun worker, and for tests:

- ``--audit DIR``: writes DIR/rank<R>.txt, every path this rank opened for writing, renamed, removed
  or made (Python's audit hooks see each of these), one a line;
- ``--plain-loss``: every Phi-3 model takes the plain loss (``chunked_loss = False``, full
  logits); either way the rank prints how many times the chunked loss ran;
- ``--die-rank R --die-at I``: rank R kills itself with SIGKILL (no clean-up, as the OOM killer
  would) when it is asked for micro-batch I;
- ``--dump DIR``: when training is done, every rank writes DIR/rank<R>.safetensors: its model's
  whole state dict (a sharded tensor gathered whole: a collective, in key order on every rank),
  the buffers and parameters of its 4-bit base weights as it holds them (``base.<module>.<name>``,
  the local shard under FSDP; none without a 4-bit base) and, as ``logits``, the model's
  eval-mode logits on :data:`DUMP_IDS` (``base_logits``: under ``lora.disabled``, the base
  model's); and DIR/rank<R>.gathered, the parameters FSDP all-gathered in training (their names,
  one a line, each once; nothing without FSDP).
- ``--watch-gathers DIR``: under FSDP, writes DIR/rank<R>.json when lora-finetune returns: how
  many gloo all-gathers (``all_gather_single``) ran, and at the start of each unit's compute (a
  forward pre-hook after the library's), the units whose parameters were gathered whole
  (``"unsharded"``) and whether any gather buffer was still held (``"buffers"``: a group's
  pending all-gather result, or the one FSDP2 keeps after a forward gather).

When ``lora-finetune`` returns, each rank prints its threads' names (``rank R: threads after the
run: [...]``, JSON; null where they cannot be read) and leaves through the interpreter's own
teardown, as ``lora-finetune`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import torch

# The sequences whose logits --dump records (token ids below the tiny tokenizer's vocabulary).
DUMP_IDS = torch.tensor([[3, 5, 7, 11, 13, 17, 19, 23], [2, 4, 6, 8, 10, 12, 14, 16]])

WRITE_EVENTS = {
    "os.rename",
    "os.replace",
    "os.remove",
    "os.rmdir",
    "os.mkdir",
    "shutil.rmtree",
    "os.truncate",
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--audit")
    ap.add_argument("--die-rank", type=int)
    ap.add_argument("--die-at", type=int)
    ap.add_argument("--die-stamp", help="write time.time() here just before dying")
    ap.add_argument("--dump", help="write each rank's model state and logits here at the end")
    ap.add_argument("--watch-gathers", help="record FSDP's gathered units at each compute")
    ap.add_argument(
        "--plain-loss", action="store_true", help="every Phi-3 model takes the plain loss"
    )
    argv = sys.argv[1:]
    cut = argv.index("::") if "::" in argv else len(argv)  # torchrun eats "--"
    args, rest = ap.parse_args(argv[:cut]), argv[cut + 1 :]
    rank = int(os.environ["RANK"])

    touched: list[str] = []
    if args.audit:

        def hook(event, hook_args):
            if event == "open" and len(hook_args) >= 3:
                path, mode, flags = hook_args[:3]
                writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
                if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                    mode is None and isinstance(flags, int) and flags & writes
                ):
                    touched.append(str(path))
            elif event in WRITE_EVENTS and hook_args:
                touched.append(str(hook_args[0]))

        sys.addaudithook(hook)

    from lora.finetune import trainer as trainer_module
    from lora.finetune.__main__ import main as cli_main
    from lora.models import phi3

    chunked_calls: list[int] = []
    if args.plain_loss:
        phi3.Phi3ForCausalLM.chunked_loss = False  # the class default, for every instance
    real_loss = phi3.linear_cross_entropy

    def counted(*a, **k):
        chunked_calls.append(1)
        return real_loss(*a, **k)

    phi3.linear_cross_entropy = counted

    if args.die_rank == rank:
        original = trainer_module.Trainer._micro_batch

        def dying(self, index):
            if index >= args.die_at:
                if args.die_stamp:
                    with open(args.die_stamp, "w") as f:
                        f.write(repr(time.time()))
                sys.stdout.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, index)

        trainer_module.Trainer._micro_batch = dying
    gathered: set[str] = set()
    if args.dump:
        from torch.distributed.fsdp._fully_shard import _fsdp_param_group as groups

        all_gather = groups.foreach_all_gather  # FSDP2's one all-gather of a unit's parameters

        def recorded(fsdp_params, *a, **k):
            gathered.update(str(p._param_fqn) for p in fsdp_params)
            return all_gather(fsdp_params, *a, **k)

        groups.foreach_all_gather = recorded
        trained = trainer_module.Trainer.train

        def train_and_dump(self, *a, **k):
            result = trained(self, *a, **k)
            os.makedirs(args.dump, exist_ok=True)
            with open(os.path.join(args.dump, f"rank{rank}.gathered"), "w") as f:
                f.write("".join(name + "\n" for name in sorted(gathered)))
            dump(self.model, os.path.join(args.dump, f"rank{rank}.safetensors"))
            return result

        trainer_module.Trainer.train = train_and_dump
    watched: list[dict] = []
    gloo_gathers: list[int] = []
    if args.watch_gathers:
        import torch.distributed as dist

        from lora.finetune import pipeline

        single = dist.all_gather_single

        def counted_gather(*a, **k):
            gloo_gathers.append(1)
            return single(*a, **k)

        dist.all_gather_single = counted_gather
        load = pipeline.load_sharded_phi3

        def watched_load(*a, **k):
            model = load(*a, **k)
            units = {m: n or "root" for n, m in model.named_modules() if hasattr(m, "unshard")}

            def look(module, _args):
                unsharded, buffers = [], 0
                for unit, name in units.items():
                    state = unit._get_fsdp_state()
                    for group in state._fsdp_param_groups:
                        if group.is_unsharded:
                            unsharded.append(name)
                        buffers += group._all_gather_result is not None
                    buffers += getattr(state._comm_ctx, "all_gather_state", None) is not None
                watched.append({"unit": units[module], "unsharded": unsharded, "buffers": buffers})

            for unit in units:
                unit.register_forward_pre_hook(look)
            return model

        pipeline.load_sharded_phi3 = watched_load
    try:
        return cli_main(rest)
    finally:
        if args.watch_gathers:
            os.makedirs(args.watch_gathers, exist_ok=True)
            with open(os.path.join(args.watch_gathers, f"rank{rank}.json"), "w") as f:
                json.dump({"all_gather_single": len(gloo_gathers), "computes": watched}, f)
        print(f"rank {rank}: chunked loss calls {len(chunked_calls)}", flush=True)
        # the job has left its process group by now: none of its backend's threads may be left
        # to the interpreter's teardown (see DistContext.close)
        print(f"rank {rank}: threads after the run: {json.dumps(thread_names())}", flush=True)
        if args.audit:
            os.makedirs(args.audit, exist_ok=True)
            with open(os.path.join(args.audit, f"rank{rank}.txt"), "w") as f:
                f.write("".join(p + "\n" for p in touched if not p.startswith(args.audit)))


def dump(model, path: str) -> None:
    """``model``'s state dict, whole (DTensors gathered on every rank alike), its 4-bit base
    weights' tensors as this rank holds them (``base.<module>.<name>``: the local shard under
    FSDP), and its logits on DUMP_IDS, to ``path``."""
    from safetensors.torch import save_file

    import lora
    from lora.quant import quantized_modules

    state = {}
    for key, tensor in model.state_dict().items():
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        state[key] = tensor.detach().cpu().clone().contiguous()
    for name, weight in quantized_modules(model).items():
        for key, t in [*weight.named_parameters(), *weight.named_buffers()]:
            if t is not None:
                local = t.to_local() if hasattr(t, "to_local") else t
                state[f"base.{name}.{key}"] = local.detach().cpu().clone().contiguous()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        state["logits"] = model(DUMP_IDS).logits.detach().cpu().contiguous()
        with lora.disabled(model):  # the base model: the frozen originals run
            state["base_logits"] = model(DUMP_IDS).logits.detach().cpu().contiguous()
    model.train(was_training)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(state, path)


def thread_names() -> list[str] | None:
    """The names of this process's threads (Linux: /proc/self/task/*/comm), sorted; None where
    they cannot be read."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    names = []
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm", encoding="utf-8") as f:
                names.append(f.read().strip())
        except OSError:  # a thread that ended meanwhile
            pass
    return sorted(names)


if __name__ == "__main__":
    sys.exit(main())
