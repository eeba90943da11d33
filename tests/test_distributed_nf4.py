"""A 4-bit (NF4) base under torchrun: two gloo ranks, data-parallel, against one process.

The same job as tests/test_distributed.py with ``quantize: "nf4"``: each rank quantises the
checkpoint as it reads it, the LoRA gradients are all-reduced as over a 16-bit base. The workers
dump their 4-bit buffers and their logits on a probe sequence when done (tests/dist_worker.py
``--dump``), so the test can check that every rank holds the same base, the one quantising the
checkpoint gives, and that the saved adapter reproduces the trained model's logits.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from dist_worker import DUMP_IDS, dump
from safetensors.torch import load_file
from test_distributed import (
    PEFT,
    TRAINING,
    adapter,
    assert_close_runs,
    losses,
    rows,
    torchrun,
    tree,
    write_config,
)
from tiny import chat_records, write_checkpoint, write_jsonl

import lora
from lora.finetune import trainer as trainer_module
from lora.finetune.__main__ import main as cli_main
from lora.finetune.state import list_checkpoints
from lora.models import Phi3ForCausalLM
from lora.quant import quantized_modules


def base_of(dumped: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in dumped.items() if k.startswith("base.")}


def quantised_checkpoint(ckpt) -> dict[str, torch.Tensor]:
    """The 4-bit buffers of the checkpoint quantised afresh in this process, as --dump names them."""
    model = Phi3ForCausalLM.from_pretrained(ckpt, quantize="nf4")
    return {
        f"base.{name}.{key}": buf
        for name, weight in quantized_modules(model).items()
        for key, buf in weight.named_buffers()
        if buf is not None
    }


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """One process with batch 6 and two gloo ranks with batch 3, both over an NF4 base."""
    root = tmp_path_factory.mktemp("dist-nf4")
    ckpt = write_checkpoint(root / "ckpt")
    data = write_jsonl(root / "chat.jsonl", chat_records(40))
    nf4 = dict(quantize="nf4", adam_epsilon=1e-6)  # epsilon: see tests/test_distributed.py
    one = write_config(root / "one.json", per_device_train_batch_size=6, **nf4)
    two = write_config(root / "two.json", per_device_train_batch_size=3, **nf4)
    common = ["--model", str(ckpt), "--data", str(data)]
    train = trainer_module.Trainer.train

    def train_and_dump(self, *a, **k):  # what the workers' --dump does, in this process
        result = train(self, *a, **k)
        dump(self.model, str(root / "dump-single" / "rank0.safetensors"))
        return result

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer_module.Trainer, "train", train_and_dump)
        code = cli_main(
            [*common, "--config", str(one), "--output", str(root / "single"), "--no-progress"]
        )
    assert code == 0
    run = torchrun(
        2,
        [*common, "--config", str(two), "--output", str(root / "ddp")],
        ["--dump", str(root / "dump-ddp")],
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return {"root": root, "ckpt": ckpt, "common": common, "one": one, "two": two, "run": run}


def test_two_ranks_over_an_nf4_base_train_as_one_process(job):
    root = job["root"]
    assert_close_runs(root / "ddp", root / "single")
    assert tree(root / "ddp") == tree(root / "single")
    train = [r for r in rows(root / "ddp") if "loss" in r]
    assert train and all(r["world_size"] == 2 for r in train)
    # params_mb counts the 4-bit weights each rank holds (packed codes and scales), not only the
    # torch Parameters (embeddings, norms, LoRA)
    model = lora.inject(Phi3ForCausalLM.from_pretrained(job["ckpt"], quantize="nf4"), PEFT)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    nf4 = sum(w.nbytes() for w in quantized_modules(model).values())
    assert nf4 > 0.05 * params  # (the tiny model is mostly embedding) a difference approx sees
    want = (params + nf4) / 2**20
    assert all(r["params_mb"] == [pytest.approx(want)] * 2 for r in train)
    assert all(
        r["params_mb"] == [pytest.approx(want)] for r in rows(root / "single") if "loss" in r
    )
    # the adapter trained: it is not the B = 0 it started from
    assert any(
        float(t.abs().max()) > 0 for k, t in adapter(root / "ddp" / "adapter").items() if "B" in k
    )


def test_every_rank_holds_the_same_unchanged_nf4_base(job):
    root = job["root"]
    ranks = [load_file(str(root / "dump-ddp" / f"rank{r}.safetensors")) for r in (0, 1)]
    want = quantised_checkpoint(job["ckpt"])
    assert want and any(k.endswith(".packed") for k in want)
    for dumped in ranks:
        got = base_of(dumped)
        assert got.keys() == want.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    # both ranks ended on the same model: the same logits, bit for bit
    assert torch.equal(ranks[0]["logits"], ranks[1]["logits"])
    single = load_file(str(root / "dump-single" / "rank0.safetensors"))
    assert base_of(single).keys() == want.keys()
    torch.testing.assert_close(ranks[0]["logits"], single["logits"], rtol=1e-4, atol=1e-5)


def test_the_saved_adapter_loads_on_one_process_and_reproduces_the_logits(job):
    root = job["root"]
    model = Phi3ForCausalLM.from_pretrained(job["ckpt"], quantize="nf4")
    lora.load_adapter(model, root / "ddp" / "adapter")
    assert quantized_modules(model)  # still a 4-bit base, the adapter on top
    with torch.no_grad():
        logits = model.eval()(input_ids=DUMP_IDS).logits
    rank0 = load_file(str(root / "dump-ddp" / "rank0.safetensors"))["logits"]
    assert torch.equal(logits, rank0)  # fp32 adapter, saved and read back exactly
    # and the adapter matters: the base alone computes other logits
    with torch.no_grad(), lora.disabled(model):
        base = model(input_ids=DUMP_IDS).logits
    assert not torch.allclose(base, rank0, rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_a_killed_nf4_job_resumes_as_the_uninterrupted_run(job):
    root, common = job["root"], job["common"]
    out = root / "killed"
    run = torchrun(
        2,
        [*common, "--config", str(job["two"]), "--output", str(out)],
        ["--die-rank", "1", "--die-at", "5"],
    )
    assert run.returncode != 0 and "rank      : 1 (local_rank: 1)" in run.stdout + run.stderr
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    single = root / "killed-then-single"
    shutil.copytree(out, single)

    # resumed on the same two ranks: bit for bit the uninterrupted two-rank run
    run = torchrun(2, [*common, "--config", str(job["two"]), "--output", str(out), "--resume"])
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert losses(out) == losses(root / "ddp")
    got, want = adapter(out / "adapter"), adapter(root / "ddp" / "adapter")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    # resumed on one process with the same global batch: the one-process run, to fp32 rounding
    code = cli_main(
        [*common, "--config", str(job["one"]), "--output", str(single), "--resume", "--no-progress"]
    )
    assert code == 0
    assert_close_runs(single, root / "single")


def test_fsdp_shards_the_nf4_base_by_blocks_and_trains_the_same_adapter(job):
    root, common = job["root"], job["common"]
    run = torchrun(
        2,
        [*common, "--config", str(job["two"]), "--output", str(root / "fsdp"), "--fsdp"],
        ["--dump", str(root / "dump-fsdp")],
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert_close_runs(root / "fsdp", root / "single")
    assert tree(root / "fsdp") == tree(root / "single")
    # each rank holds its half of the blocks; together, bitwise the base one process quantises
    ranks = [base_of(load_file(str(root / "dump-fsdp" / f"rank{r}.safetensors"))) for r in (0, 1)]
    want = quantised_checkpoint(job["ckpt"])
    assert ranks[0].keys() == ranks[1].keys() == want.keys()
    for key, whole in want.items():
        if key.endswith((".packed", ".scale_codes")):
            halves = [r[key].reshape(-1) for r in ranks]
            assert 0 < halves[0].numel() < whole.numel() and halves[1].numel() > 0, key
            assert torch.equal(torch.cat(halves), whole), key
        else:  # the group absmax and the mean: whole on every rank
            assert all(torch.equal(r[key], whole) for r in ranks), key
    held = [r["params_mb"] for r in rows(root / "fsdp") if "loss" in r][-1]
    whole_mb = [r["params_mb"] for r in rows(root / "single") if "loss" in r][-1][0]
    assert len(held) == 2 and all(h < 0.8 * whole_mb for h in held)
    # the adapter it saved reproduces its logits on one process
    model = Phi3ForCausalLM.from_pretrained(job["ckpt"], quantize="nf4")
    lora.load_adapter(model, root / "fsdp" / "adapter")
    with torch.no_grad():
        logits = model.eval()(input_ids=DUMP_IDS).logits
    dumped = load_file(str(root / "dump-fsdp" / "rank0.safetensors"))["logits"]
    torch.testing.assert_close(logits, dumped, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_fsdp_over_nf4_with_checkpointing_killed_and_resumed_on_one_process(job, tmp_path):
    # gradient checkpointing: the recomputation runs in backward, inside FSDP's gathered unit
    common = job["common"]
    one = write_config(
        tmp_path / "one.json",
        per_device_train_batch_size=6,
        quantize="nf4",
        adam_epsilon=1e-6,
        gradient_checkpointing=True,
    )
    two = write_config(
        tmp_path / "two.json",
        per_device_train_batch_size=3,
        quantize="nf4",
        adam_epsilon=1e-6,
        gradient_checkpointing=True,
    )
    code = cli_main(
        [*common, "--config", str(one), "--output", str(tmp_path / "single"), "--no-progress"]
    )
    assert code == 0
    out = tmp_path / "fsdp"
    run = torchrun(
        2,
        [*common, "--config", str(two), "--output", str(out), "--fsdp"],
        ["--die-rank", "1", "--die-at", "5"],
    )
    assert run.returncode != 0 and "rank      : 1 (local_rank: 1)" in run.stdout + run.stderr
    assert [s for s, _ in list_checkpoints(out)] == [2, 4]
    code = cli_main(
        [*common, "--config", str(one), "--output", str(out), "--resume", "--no-progress"]
    )
    assert code == 0
    assert_close_runs(out, tmp_path / "single")


# --- modules_to_save over the 4-bit base, under FSDP ---------------------------------------------
SAVED_PEFT = {**PEFT, "modules_to_save": ["layers.1.mlp"]}


def write_saved_config(path, **training):
    body = {
        "training_config": {**TRAINING, "quantize": "nf4", "adam_epsilon": 1e-6, **training},
        "peft_config": SAVED_PEFT,
    }
    path.write_text(json.dumps(body))
    return path


@pytest.mark.filterwarnings("ignore::lora.SavedTargetWarning")
def test_fsdp_over_nf4_trains_a_modules_to_save_copy_whole_from_the_dequantised_weights(job):
    """The copy of a module over the 4-bit base is 16/32-bit and trainable, whole on every rank
    (ignored by FSDP), filled as one process fills it; the 4-bit original stays sharded."""
    root, common, ckpt = job["root"], job["common"], job["ckpt"]
    one = write_saved_config(root / "saved-one.json", per_device_train_batch_size=6)
    two = write_saved_config(root / "saved-two.json", per_device_train_batch_size=3)
    args = [*common, "--config", str(one), "--output", str(root / "saved-single"), "--no-progress"]
    assert cli_main(args) == 0
    run = torchrun(
        2,
        [*common, "--config", str(two), "--output", str(root / "saved-fsdp"), "--fsdp"],
        ["--dump", str(root / "saved-dump")],
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert_close_runs(root / "saved-fsdp", root / "saved-single")

    # what one process's copy starts from: the dequantised 4-bit weights
    model = lora.inject(
        Phi3ForCausalLM.from_pretrained(ckpt, quantize="nf4"), lora.LoRAConfig(**SAVED_PEFT)
    )
    wrapper = model.get_submodule("model.layers.1.mlp")
    start = {
        f"model.layers.1.mlp.modules_to_save.default.{n}": p.detach()
        for n, p in wrapper.modules_to_save["default"].named_parameters()
    }
    assert sorted(start) == [
        "model.layers.1.mlp.modules_to_save.default.down_proj.weight",
        "model.layers.1.mlp.modules_to_save.default.gate_up_proj.weight",
    ]
    ranks = [load_file(str(root / "saved-dump" / f"rank{r}.safetensors")) for r in (0, 1)]
    saved = adapter(root / "saved-fsdp" / "adapter")
    for key, value in start.items():
        a, b = ranks[0][key], ranks[1][key]
        assert a.shape == value.shape and torch.equal(a, b), key  # whole, the same on both ranks
        assert not torch.equal(a, value), key  # it trained
        file_key = "base_model.model." + key.replace(".modules_to_save.default", "")
        assert torch.equal(saved[file_key], a), key
    # the 4-bit original: sharded, its shards together bitwise the one-process quantisation
    want = {
        k: v
        for k, v in quantised_checkpoint(ckpt).items()
        if k.startswith("base.model.layers.1.mlp.")
    }
    assert want
    for key, whole in want.items():
        name = key.replace("base.model.layers.1.mlp.", "base.model.layers.1.mlp.original_module.")
        parts = [r[name].reshape(-1) for r in ranks]
        if key.endswith((".packed", ".scale_codes")):
            assert 0 < parts[0].numel() < whole.numel(), key
            assert torch.equal(torch.cat(parts), whole.reshape(-1)), key
    assert not [k for k in ranks[0] if k.startswith("base.") and ".modules_to_save." in k]
    # the adapter loads on one process over a 4-bit base and gives the distributed logits
    again = lora.load_adapter(
        Phi3ForCausalLM.from_pretrained(ckpt, quantize="nf4"), root / "saved-fsdp" / "adapter"
    )
    with torch.no_grad():
        logits = again.eval()(input_ids=DUMP_IDS).logits
    torch.testing.assert_close(logits, ranks[0]["logits"], rtol=1e-5, atol=1e-6)

    # with a learning rate of 0 nothing moves: the copy FSDP loaded is bitwise one process's
    still = write_saved_config(
        root / "saved-still.json", per_device_train_batch_size=3, learning_rate=0.0, max_steps=1
    )
    run = torchrun(
        2,
        [*common, "--config", str(still), "--output", str(root / "saved-still"), "--fsdp"],
        ["--dump", str(root / "saved-still-dump")],
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for r in (0, 1):
        dumped = load_file(str(root / "saved-still-dump" / f"rank{r}.safetensors"))
        for key, value in start.items():
            assert dumped[key].dtype == value.dtype and torch.equal(dumped[key], value), key
