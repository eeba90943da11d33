"""Whole runs of our trainer against transformers' Trainer + PEFT, step by step.

The same tiny Phi-3 checkpoint is loaded twice: as ours, through the pipeline (``build_trainer``),
and as transformers' ``Phi3ForCausalLM`` wrapped by ``peft.get_peft_model``. Both start from the
same adapter (ours, with a random B, copied into PEFT's), see the same micro-batches in the same
order (transformers' Trainer is given a sampler drawing our per-epoch permutations, and our collate
function), and train with the same training_config keys. Each test checks that the inputs are
identical micro-batch by micro-batch (ids, labels, positions, mask, the accumulated label count,
the optimizer step each belongs to), then compares what both sides log (loss as the mean over the
logging window, learning rate, pre-clip gradient norm, epoch), the run's train_loss and the final
adapter tensors.

Tolerances (fp32): the inputs, step counts, epochs and learning rates are equal (to 1e-12
relative); logged losses, train_loss and adapter tensors agree to ``ATOL`` = 1e-5 absolute, the
gradient norms to 1e-5 relative. Measured: losses <= 7.2e-7, train_loss <= 1.3e-7, gradient
norms <= 2e-7 relative, adapter tensors <= 2.6e-6 (the saved RMSNorm weights, which are near 1;
<= 2.1e-7 for LoRA's A and B and a saved head), against updates of 2e-2 to 5e-2. What is left is
float32 rounding in another order (our chunked loss against transformers' one-shot cross-entropy,
our LoRA and attention kernels against PEFT's and SDPA's); AdamW passes it on to updates of about
its size. bf16 (slow): losses within 2e-3 absolute (measured 4.4e-4), gradient norms within 5e-2
relative (1.5e-2), the adapter's update within 10% of its size (2.9%).

Where our 4-D packed mask goes to transformers it is given the causal part too: ours marks which
tokens share a conversation and the model adds causality; transformers takes a 4-D mask as the
whole attention pattern (docs/data.md).

Skips without transformers, peft or accelerate (the test extra).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file
from tiny import chat_records, write_checkpoint, write_jsonl

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytest.importorskip("accelerate")

import lora  # noqa: E402
from lora.adapters import WEIGHTS_NAME, save_adapter  # noqa: E402
from lora.finetune import TrainingConfig, build_trainer  # noqa: E402
from lora.finetune.trainer import make_optimizer  # noqa: E402

transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.filterwarnings(
    "ignore:`is_gradient_checkpointing`:FutureWarning",
    "ignore:`gradient_checkpointing` is deprecated:FutureWarning",
    "ignore:Setting `save_embedding_layers`:UserWarning",
)
ATOL = 1e-5
# training_config keys that mean the same to both trainers and go to both as they are.
SHARED = (
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "num_train_epochs",
    "max_steps",
    "lr_scheduler_type",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "logging_steps",
    "logging_first_step",
    "gradient_checkpointing",
    "bf16",
    "seed",
    "optim",
)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"))


class OurOrder(torch.utils.data.Sampler):
    """Our trainer's data order (a permutation per epoch, seeded with seed + epoch) for
    transformers' Trainer, which calls set_epoch before each epoch."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())


def with_causal_mask(collate):
    """Our collate function, with a packed batch's 4-D mask made the whole pattern transformers
    expects (same conversation AND not in the future)."""

    def collate_for_transformers(examples):
        batch = collate(examples)
        mask = batch["attention_mask"]
        if mask.dim() == 4:
            S = mask.shape[-1]
            batch["attention_mask"] = mask & torch.ones(S, S, dtype=torch.bool).tril()
        return batch

    return collate_for_transformers


def recorder(store: list, step):
    def hook(module, args, kwargs):
        row = {k: kwargs[k].detach().clone() for k in ("input_ids", "labels", "position_ids")}
        row["attention_mask"] = kwargs["attention_mask"].detach().clone()
        row["num_items"] = int(kwargs["num_items_in_batch"])
        row["step"] = step()
        store.append(row)

    return hook


def transformers_arguments(training: dict, output_dir: Path) -> transformers.TrainingArguments:
    kwargs = {k: training[k] for k in SHARED if k in training}
    if "warmup_ratio" in training:  # transformers 5 has no warmup_ratio: a float warmup_steps < 1
        kwargs["warmup_steps"] = training["warmup_ratio"]
    if "warmup_steps" in training:
        kwargs["warmup_steps"] = training["warmup_steps"]
    return transformers.TrainingArguments(
        output_dir=str(output_dir),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        **kwargs,
    )


def run_both(root: Path, ckpt: Path, training: dict, peft_config: dict, records: int = 22):
    """Train ours and transformers' Trainer + PEFT from the same start on the same batches."""
    data_file = write_jsonl(root / "chat.jsonl", chat_records(records))
    training = {"seed": 0, "optim": "adamw_torch", **training}
    ours_config = TrainingConfig.from_dict(
        {
            "output_dir": str(root / "ours"),
            "save_strategy": "no",
            "do_eval": False,
            "use_cpu": True,
            "max_seq_length": 64,
            **training,
        }
    )
    trainer = build_trainer(
        ckpt,
        data_file,
        ours_config,
        lora.LoRAConfig(**peft_config),
        log=lambda line: None,
        progress=False,
        data_cache=False,
    )
    ours = trainer.model
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a fresh B is zero: give it values, so every A has a gradient too
        for name, p in ours.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    save_adapter(ours, root / "start")
    start = load_file(root / "start" / WEIGHTS_NAME)

    dtype = torch.bfloat16 if training.get("bf16") else torch.float32
    hf = transformers.Phi3ForCausalLM.from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa")
    theirs = peft.get_peft_model(hf, peft.LoraConfig(**peft_config, init_lora_weights=False))
    loaded = peft.set_peft_model_state_dict(theirs, start)
    assert not loaded.unexpected_keys
    got = peft.get_peft_model_state_dict(theirs)
    assert got.keys() == start.keys()  # the same modules adapted and saved, in both
    assert all(torch.equal(got[k], start[k]) for k in start)
    trainable = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (ours, theirs)]
    assert trainable[0] == trainable[1]

    seen_ours: list[dict] = []
    seen_theirs: list[dict] = []
    ours.register_forward_pre_hook(recorder(seen_ours, lambda: trainer.step), with_kwargs=True)
    args = transformers_arguments(training, root / "theirs")

    class SameOrder(transformers.Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return OurOrder(len(self.train_dataset), args.seed)

    reference = SameOrder(
        model=theirs,
        args=args,
        train_dataset=[trainer.data.train[i] for i in range(len(trainer.data.train))],
        data_collator=with_causal_mask(trainer.data.collate_fn()),
    )
    hf.register_forward_pre_hook(
        recorder(seen_theirs, lambda: reference.state.global_step), with_kwargs=True
    )
    out = reference.train()
    try:
        result = trainer.train()
    finally:
        trainer.release_lock()
    return {
        "trainer": trainer,
        "reference": reference,
        "ours": result,
        "theirs": out,
        "seen": (seen_ours, seen_theirs),
        "start": start,
        "adapters": (
            load_file(Path(result.adapter_dir) / WEIGHTS_NAME),
            peft.get_peft_model_state_dict(theirs),
        ),
    }


def check_same_inputs(run) -> None:
    ours, theirs = run["seen"]
    assert len(ours) == len(theirs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        for key in ("input_ids", "labels", "position_ids", "num_items", "step"):
            assert torch.equal(torch.as_tensor(a[key]), torch.as_tensor(b[key])), (i, key)
        mask = a["attention_mask"]
        if mask.dim() == 4:
            mask = mask & torch.ones(mask.shape[-1], mask.shape[-1], dtype=torch.bool).tril()
        assert torch.equal(mask, b["attention_mask"]), i


def logged(run) -> tuple[dict[int, dict], dict[int, dict]]:
    ours = {r["step"]: r for r in run["ours"].metrics if "loss" in r}
    theirs = {r["step"]: r for r in run["reference"].state.log_history if "loss" in r}
    return ours, theirs


def max_adapter_diff(run) -> float:
    ours, theirs = run["adapters"]
    assert ours.keys() == theirs.keys()
    return max((ours[k].float() - theirs[k].float()).abs().max().item() for k in ours)


def check_same_run(run, atol: float = ATOL, grad_rtol: float = 1e-5) -> None:
    trainer = run["trainer"]
    assert run["ours"].steps == run["reference"].state.global_step == trainer.total_steps
    ours, theirs = logged(run)
    # Both log every logging_steps; ours logs the last step as well (docs/finetune.md).
    assert set(ours) - set(theirs) <= {trainer.total_steps} and set(theirs) <= set(ours)
    for step, want in theirs.items():
        got = ours[step]
        assert got["loss"] == pytest.approx(want["loss"], abs=atol), step
        assert got["learning_rate"] == pytest.approx(want["learning_rate"], rel=1e-12, abs=0)
        assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=grad_rtol), step
        assert got["epoch"] == pytest.approx(want["epoch"], rel=1e-12), step
    assert run["ours"].train_loss == pytest.approx(run["theirs"].training_loss, abs=atol)
    start, trained = run["start"], run["adapters"][0]
    assert any(not torch.equal(start[k], trained[k]) for k in start)  # it trained


@pytest.mark.filterwarnings("ignore::lora.SavedTargetWarning")
def test_recipe_settings_and_their_neighbours_train_as_transformers_trainer(ckpt, tmp_path):
    # 22 sequences in micro-batches of 5: 5 per epoch (the last of 2), with different label
    # counts; gradient accumulation 2: 3 steps per epoch, the last of one micro-batch; 2 epochs.
    training = {
        "learning_rate": 1e-2,
        "per_device_train_batch_size": 5,
        "gradient_accumulation_steps": 2,
        "num_train_epochs": 2,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.2,
        "weight_decay": 0.1,
        "max_grad_norm": 0.5,
        "adam_beta1": 0.8,
        "adam_beta2": 0.95,
        "adam_epsilon": 1e-6,
        "logging_steps": 2,
        "logging_first_step": True,
    }
    peft_config = {
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "bias": "all",  # Phi-3 has no bias: nothing more trains, on either side
        "target_modules": "all-linear",
        "modules_to_save": ["lm_head"],  # a trained head: decayed on both sides
        "task_type": "CAUSAL_LM",
    }
    run = run_both(tmp_path, ckpt, training, peft_config)
    check_same_inputs(run)
    assert run["trainer"].total_steps == 6 and len(run["seen"][0]) == 10
    assert {r["num_items"] for r in run["seen"][0]} != {run["seen"][0][0]["num_items"]}
    ours, theirs = logged(run)
    assert sorted(theirs) == [1, 2, 4, 6]
    assert max(r["grad_norm"] for r in ours.values()) > training["max_grad_norm"]  # it clips
    check_same_run(run)
    assert max_adapter_diff(run) <= ATOL


def test_packed_sequences_linear_warmup_and_saved_norms_train_as_transformers_trainer(
    ckpt, tmp_path
):
    training = {
        "learning_rate": 1e-2,
        "per_device_train_batch_size": 2,
        "max_steps": 4,
        "lr_scheduler_type": "linear",
        "warmup_steps": 1,
        "weight_decay": 0.5,
        "max_grad_norm": 1.0,
        "logging_steps": 1,
        "gradient_checkpointing": True,
        "packing": True,
    }
    peft_config = {
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "target_modules": "all-linear",
        # PEFT's modules_to_save rule: a name ending with "norm" as a string, so model.norm and
        # every decoder layer's input_layernorm and post_attention_layernorm (1-D: not decayed)
        "modules_to_save": ["norm"],
        "task_type": "CAUSAL_LM",
    }
    run = run_both(tmp_path, ckpt, training, peft_config)
    assert run["seen"][0][0]["attention_mask"].dim() == 4  # packed
    check_same_inputs(run)
    saved = {k for k in run["start"] if "norm" in k}
    assert len(saved) == 1 + 2 * 2  # model.norm and both norms of the 2 layers
    check_same_run(run)
    assert max_adapter_diff(run) <= ATOL


@pytest.mark.slow
def test_bf16_runs_as_transformers_trainer_up_to_bfloat16_rounding(ckpt, tmp_path):
    # transformers' bf16=true is autocast over the model as loaded (the recipe loads it in
    # bfloat16, and PEFT keeps the adapter in float32); ours is the bfloat16 base with a float32
    # adapter and no autocast. The same computation up to where bfloat16 rounding happens.
    training = {
        "learning_rate": 1e-2,
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 2,
        "max_steps": 4,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.2,
        "max_grad_norm": 0.5,
        "logging_steps": 1,
        "bf16": True,
    }
    peft_config = {
        "r": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        "target_modules": "all-linear",
        "task_type": "CAUSAL_LM",
    }
    run = run_both(tmp_path, ckpt, training, peft_config, records=40)
    check_same_inputs(run)
    check_same_run(run, atol=2e-3, grad_rtol=5e-2)
    ours, theirs = run["adapters"]
    start = run["start"]
    apart = sum(((ours[k].float() - theirs[k].float()) ** 2).sum() for k in ours).sqrt()
    moved = sum(((ours[k].float() - start[k].float()) ** 2).sum() for k in ours).sqrt()
    assert apart <= 0.1 * moved


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::lora.SavedTargetWarning")
def test_a_longer_run_with_accumulation_across_three_epochs(ckpt, tmp_path):
    training = {
        "learning_rate": 5e-3,
        "per_device_train_batch_size": 3,
        "gradient_accumulation_steps": 3,
        "num_train_epochs": 3,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.1,
        "weight_decay": 0.05,
        "max_grad_norm": 0.3,
        "logging_steps": 3,
    }
    peft_config = {
        "r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        "target_modules": "all-linear",
        "modules_to_save": ["embed_tokens", "lm_head"],
        "task_type": "CAUSAL_LM",
    }
    # 50 sequences in micro-batches of 3: 17 a epoch, 6 steps of them (the last of 2)
    run = run_both(tmp_path, ckpt, training, peft_config, records=50)
    check_same_inputs(run)
    assert run["trainer"].total_steps == 18
    check_same_run(run)
    assert max_adapter_diff(run) <= ATOL


def _our_name(peft_name: str) -> str:
    # PEFT's parameter names, as ours: no prefix, no base_layer, lora_A/B as parameters
    name = peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")
    return re.sub(r"\.(lora_[AB])\.default\.weight$", r".\1", name)


def test_weight_decay_falls_on_the_same_parameters_as_in_transformers_trainer():
    # transformers decays every parameter but biases and norms (by name, and nn.LayerNorm's);
    # ours every parameter of two or more dimensions. On a model with biases, a LayerNorm, a conv
    # and a trained head and norm (bias="all": the LayerNorm's bias trains too) they pick the same.
    from tiny import Toy

    config = {
        "r": 2,
        "target_modules": ["q_proj", "v_proj", "conv"],
        "bias": "all",
        "modules_to_save": ["lm_head", "blocks.0.norm"],
    }
    ours = lora.inject(Toy(), lora.LoRAConfig(**config))
    theirs = peft.get_peft_model(Toy(), peft.LoraConfig(**config))
    params = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    trained = {_our_name(n) for n, p in theirs.named_parameters() if p.requires_grad}
    assert trained == set(params)
    args = transformers.TrainingArguments(output_dir="unused", weight_decay=0.1, use_cpu=True)
    decayed = {
        _our_name(n)
        for n in transformers.Trainer(model=theirs, args=args).get_decay_parameter_names(theirs)
    }
    optimizer = make_optimizer(TrainingConfig(weight_decay=0.1), list(params.values()))
    name_of = {id(p): n for n, p in params.items()}
    ours_decayed = {
        name_of[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]
    }
    assert ours_decayed == decayed & trained
    assert {
        "blocks.1.norm.bias",
        "blocks.0.norm.modules_to_save.default.weight",
    } <= trained - decayed
    assert {"lm_head.modules_to_save.default.weight", "conv.lora_A"} <= ours_decayed
