"""Under FSDP2 the training loss is the chunked, labelled-only one (as in one process): the lm_head,
a unit of its own that FSDP2 turns into an ``FSDPLinear``, is gathered for the loss's forward
alone and resharded after it; the full (N, V) logits are never built. Before, the class swap
failed the plain-head gate and every FSDP step built fp32 logits of (batch x seq, vocab) and
their gradient (about 1 GiB each a rank at the recipe's 4 x 2048).

Two gloo ranks (torchrun) on the tiny checkpoint, every rank on the same batch: each rank's loss
and LoRA gradients against one unsharded model's, with the full-logits loss. The head kinds that
take the plain path (a LoRA lm_head, a modules_to_save one: trained, so not the frozen head the
chunked loss takes) and the tied head (in the root unit) are checked for parity too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import write_checkpoint

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="needs torch.distributed"
)

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, os, sys
from pathlib import Path
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
import lora
from lora.finetune.distributed import load_sharded_phi3, setup
from lora.models import Phi3ForCausalLM, phi3

ckpt, head, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
extra = {"lora": {"target_modules": ["qkv_proj", "down_proj", "lm_head"]},
         "saved": {"modules_to_save": ["lm_head"]}}.get(head, {})
cfg = lora.LoRAConfig(**{"r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                         "target_modules": "all-linear", **extra})

def randomize_b(model):
    # B starts at zero (no gradient for A); the same values in both models, by name
    for i, (name, p) in enumerate(sorted(model.named_parameters())):
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
g = torch.Generator().manual_seed(1)
ids = torch.randint(2, 300, (3, 200), generator=g)
labels = ids.clone()
labels[:, :50] = -100
n_counted = int((labels[:, 1:] != -100).sum())  # 447 rows: two chunks of the chunked loss

torch.manual_seed(0)
one = lora.inject(Phi3ForCausalLM.from_pretrained(ckpt), cfg).train()
randomize_b(one)
one.chunked_loss = False  # the reference: full logits, F.cross_entropy
ref = one(ids, labels=labels).loss
ref.backward()
want = {n: p.grad for n, p in one.named_parameters() if p.grad is not None}

ctx = setup("cpu", fsdp=True)
torch.manual_seed(0)  # the LoRA init drawn as inject draws it
model = load_sharded_phi3(ckpt, cfg, torch.float32, ctx).train()
randomize_b(model)
vocab = model.config.vocab_size
units = {m: n or "root" for n, m in model.named_modules() if hasattr(m, "unshard")}

def gathered():
    names, buffers = [], 0
    for unit, name in units.items():
        state = unit._get_fsdp_state()
        for group in state._fsdp_param_groups:
            names += [name] if group.is_unsharded else []
            buffers += group._all_gather_result is not None
        buffers += getattr(state._comm_ctx, "all_gather_state", None) is not None
    return sorted(names), buffers

at_loss = []
real_loss = phi3.linear_cross_entropy
def watched_loss(*a, **k):
    at_loss.append(gathered())
    return real_loss(*a, **k)
phi3.linear_cross_entropy = watched_loss

class VocabRows(TorchDispatchMode):
    # the most rows of any tensor an op made with vocab-wide rows: logits, whole or a chunk
    most = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == vocab:
                self.most = max(self.most, t.numel() // vocab)
        return out

with VocabRows() as rows:
    loss = model(ids, labels=labels).loss
    loss.backward()
got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
after = gathered()
grads_close = sorted(got) == sorted(want) and all(
    torch.allclose(got[n], want[n], rtol=1e-4, atol=1e-6) for n in want)
worst = max(((got[n] - want[n]).abs().max().item() for n in want if n in got), default=None)
(out / f"rank{ctx.rank}.json").write_text(json.dumps({
    "rank": ctx.rank, "head_class": type(model.lm_head).__name__,
    "loss": loss.item(), "ref": ref.item(), "grads_close": grads_close, "n_grads": len(want),
    "worst": worst, "at_loss": at_loss, "after": after,
    "vocab_rows": rows.most, "counted": n_counted}))
ctx.close()
"""


def two_gloo_ranks(tmp_path: Path, *args: str) -> list[dict]:
    """SCRIPT on two torchrun ranks with ``args``; what each rank wrote, in rank order."""
    script = tmp_path / "fsdp_loss_rank.py"
    out = tmp_path / "ranks"
    out.mkdir()
    script.write_text(SCRIPT)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
        OMP_NUM_THREADS="1",
    )
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--monitor-interval=0.2",
        str(script),
        *args,
        str(out),
    ]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow  # ~8 s; the default run checks the chunked loss under FSDP in test_distributed
def test_fsdp_runs_the_chunked_loss_with_only_the_head_gathered(tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt")
    for r in two_gloo_ranks(tmp_path, str(ckpt), "plain"):
        assert r["head_class"] == "FSDPLinear"  # the class swap that the gate refused
        assert r["loss"] == pytest.approx(r["ref"], rel=1e-5)
        assert r["grads_close"] and r["n_grads"] > 0, r["worst"]
        # the chunked loss ran once, with the head and the root (the final norm) gathered, no
        # other unit and no gather buffer held; the head is resharded after it
        assert r["at_loss"] == [[["lm_head", "root"], 0]]
        assert "lm_head" not in r["after"][0]
        # no full logits: at most one chunk (256 rows, padded to 16) of vocab-wide rows
        assert r["vocab_rows"] <= 256 + 16 < r["counted"]


@pytest.mark.slow
@pytest.mark.parametrize("head", ["tied", "lora", "saved"])
def test_fsdp_heads_that_are_not_a_plain_unit_train_as_one_process(tmp_path, head):
    """A tied head sits in the root unit (gathered with it) and takes the chunked loss; a LoRA or
    a modules_to_save head (trained) takes the plain one under FSDP as in one process."""
    ckpt = write_checkpoint(tmp_path / "ckpt", tie_word_embeddings=head == "tied")
    for r in two_gloo_ranks(tmp_path, str(ckpt), head):
        assert r["loss"] == pytest.approx(r["ref"], rel=1e-5)
        assert r["grads_close"] and r["n_grads"] > 0, r["worst"]
        assert len(r["at_loss"]) == (head == "tied")


TRIMS = r"""
import json, sys
from pathlib import Path
import torch
import lora
from lora.finetune import distributed
from lora.finetune.distributed import load_sharded_phi3, setup
from lora.models import phi3

calls = {"model": 0, "units": 0}
def counter(who, real):
    def trim():
        calls[who] += 1
        return real()
    return trim
phi3.trim_heap = counter("model", phi3.trim_heap)
distributed.trim_heap = counter("units", distributed.trim_heap)
ctx = setup("cpu", fsdp=True)
cfg = lora.LoRAConfig(r=4, lora_alpha=8, target_modules="all-linear")
model = load_sharded_phi3(Path(sys.argv[1]), cfg, torch.float32, ctx).train()
model.gradient_checkpointing_enable()
model.model.release_heap_every = 1  # the model's own: before every layer and recomputation
calls.update(model=0, units=0)
ids = torch.randint(2, 300, (2, 16), generator=torch.Generator().manual_seed(0))
model(ids, labels=ids).loss.backward()
print("RESULT " + json.dumps({**calls, "layers": len(model.model.layers)}))
ctx.close()
"""


def test_under_fsdp_the_model_leaves_the_trims_between_layers_to_the_units(tmp_path):
    """FSDP on CPU trims the heap before each unit computes; a checkpointed Phi-3 trimmed before
    its layers too, back to back with those: now only its trim before the loss is its own."""
    from test_sharded_copies import one_gloo_rank

    out = one_gloo_rank(TRIMS, str(write_checkpoint(tmp_path / "ckpt")))
    n = out["layers"]
    assert out["model"] == 1  # before the final norm and the loss
    # the root, the embedding, each layer's forward and recomputation; not the head, gathered
    # for the loss outside its forward (the model's trim before the loss comes just before)
    assert out["units"] == 2 + 2 * n
