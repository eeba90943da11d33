"""One rank of a test job, launched as

    torchrun ... tests/dist_worker.py [--audit DIR] [--die-rank R --die-at I] :: ARGS

Runs ``lora-finetune ARGS`` (lora.finetune.__main__.main) in this torchrun worker, and for tests:

- ``--audit DIR``: writes DIR/rank<R>.txt, every path this rank opened for writing, renamed, removed
  or made (Python's audit hooks see each of these), one a line;
- ``--plain-loss``: every Phi-3 model takes the plain loss (``chunked_loss = False``, full
  logits); either way the rank prints how many times the chunked loss ran;
- ``--die-rank R --die-at I``: rank R kills itself with SIGKILL (no clean-up, as the OOM killer
  would) when it is asked for micro-batch I;
- ``--dump DIR``: when training is done, every rank writes DIR/rank<R>.safetensors: the buffers of
  its 4-bit base weights (``base.<module>.<buffer>``, the local shard under FSDP) and its model's
  logits on :data:`PROBE` (``logits``; under FSDP every rank computes them together).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

# The token ids the --dump logits are computed on (one sequence).
PROBE = [[5, 17, 42, 7, 99, 3, 64, 12, 250, 31, 8, 77]]

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
    ap.add_argument("--dump", help="write each rank's 4-bit base and probe logits here at the end")
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
    if args.dump:
        train = trainer_module.Trainer.train

        def train_and_dump(self, *a, **k):
            result = train(self, *a, **k)
            dump(self.model, args.dump, rank)
            return result

        trainer_module.Trainer.train = train_and_dump
    try:
        return cli_main(rest)
    finally:
        print(f"rank {rank}: chunked loss calls {len(chunked_calls)}", flush=True)
        if args.audit:
            os.makedirs(args.audit, exist_ok=True)
            with open(os.path.join(args.audit, f"rank{rank}.txt"), "w") as f:
                f.write("".join(p + "\n" for p in touched if not p.startswith(args.audit)))


def dump(model, directory: str, rank: int) -> None:
    import torch
    from safetensors.torch import save_file

    from lora.quant import quantized_modules

    out = {}
    for name, weight in quantized_modules(model).items():
        for key, buf in [*weight.named_parameters(), *weight.named_buffers()]:
            if buf is not None:
                local = buf.to_local() if hasattr(buf, "to_local") else buf
                out[f"base.{name}.{key}"] = local.detach().cpu().contiguous()
    was_training = model.training
    model.eval()
    with torch.no_grad():
        ids = torch.tensor(PROBE, device=model.lm_head.weight.device)
        out["logits"] = model(input_ids=ids).logits.float().cpu().contiguous()
    model.train(was_training)
    os.makedirs(directory, exist_ok=True)
    save_file(out, os.path.join(directory, f"rank{rank}.safetensors"))


if __name__ == "__main__":
    sys.exit(main())
