"""Tiny, self-made checkpoint directories and chat data for tests (no download, built in seconds)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from torch import nn

PHI3_SPECIALS = ["<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]
WORDS = [
    "red",
    "blue",
    "green",
    "cat",
    "dog",
    "bird",
    "one",
    "two",
    "three",
    "tree",
    "house",
    "river",
]
CORPUS = [
    "the cat sat on the mat and the dog ran to the park",
    "hello world, how are you today? I am fine, thank you.",
    "Anna has 12 red apples and Tom has 3 blue balls.",
    " ".join(WORDS) + " repeat after me please say",
]


def write_tokenizer(
    directory: Path,
    vocab_size: int = 300,
    *,
    corpus: list[str] = CORPUS,
    split_digits: bool = False,
) -> Path:
    """A small byte-level BPE with Phi-3's chat tokens and the Phi-3 chat template, trained on
    ``corpus``; ``split_digits``: every digit its own token (as Phi-3's tokenizer does)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lora.data import PHI3_CHAT_TEMPLATE

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus * 20, trainer)
    tok.add_special_tokens(PHI3_SPECIALS)
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {
        "bos_token": "<s>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<unk>",
        "chat_template": PHI3_CHAT_TEMPLATE,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    ids = [tok.token_to_id(t) for t in ("<|endoftext|>", "<|end|>")]
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}))
    return directory


def write_checkpoint(
    directory: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **config
) -> Path:
    """A random tiny Phi-3 (GQA) with the tokenizer above, saved with save_pretrained; built in
    ``dtype`` (bfloat16 for a full-size one: half the memory and file bytes of float32)."""
    from tokenizers import Tokenizer

    from lora.models import Phi3Config, Phi3ForCausalLM

    write_tokenizer(directory)
    vocab = Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab_size()
    cfg = dict(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    cfg.update(config)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = Phi3ForCausalLM(Phi3Config(**cfg))
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(directory)
    return directory


def chat_records(n: int, seed: int = 0) -> list[dict]:
    """``n`` conversations teaching "say W" -> "W" over a few words."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        word = rng.choice(WORDS)
        messages = [
            {"role": "user", "content": f"say {word}"},
            {"role": "assistant", "content": word},
        ]
        if rng.random() < 0.3:
            messages.insert(0, {"role": "system", "content": "repeat after me"})
        out.append({"messages": messages})
    return out


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# The two-layer Phi-3 of the adapter and surgery tests: a 64-token vocabulary, grouped-query
# attention (4 heads over 2 key/value heads).
ADAPTER_PHI3 = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)
# One layer of it for the modules_to_save tests (a vocabulary small enough that the head and the
# embedding are worth a trained copy), and the ids they run.
MODULES_TO_SAVE_IDS = torch.tensor([[3, 5, 7, 11, 13, 17], [2, 4, 6, 8, 10, 12]])
MODULES_TO_SAVE_PHI3 = dict(ADAPTER_PHI3, num_hidden_layers=1, max_position_embeddings=64)
# A tiny Phi-3 config (grouped-query attention), and longrope settings to add to it.
TINY_PHI3 = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)
LONGROPE = dict(
    max_position_embeddings=64,
    original_max_position_embeddings=16,
    rope_scaling={
        "type": "longrope",
        "short_factor": [1.0, 1.2, 1.5, 2.0],
        "long_factor": [2.0, 4.0, 8.0, 16.0],
    },
)


class Toy(nn.Module):
    """A small model with every layer type LoRA adapts, a LayerNorm it does not, and an output head."""

    def __init__(self, groups: int = 1, padding_idx: int | None = None):
        super().__init__()
        self.embed = nn.Embedding(20, 8, padding_idx=padding_idx)
        self.conv = nn.Conv1d(8, 8, 3, padding=1, groups=groups)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "q_proj": nn.Linear(8, 8),
                    "v_proj": nn.Linear(8, 8, bias=False),
                    "norm": nn.LayerNorm(8),
                }
            )
            for _ in range(2)
        )
        self.lm_head = nn.Linear(8, 20)

    def forward(self, ids):
        h = self.embed(ids)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        for b in self.blocks:
            h = b["norm"](h + b["q_proj"](h) * torch.sigmoid(b["v_proj"](h)))
        return self.lm_head(h)


# The fine-tuning tests' shared settings: a tiny LoRA and a short run (8 steps, a checkpoint every 4).
TINY_PEFT = {
    "r": 4,
    "lora_alpha": 8,
    "lora_dropout": 0.1,
    "bias": "none",
    "task_type": "CAUSAL_LM",
    "target_modules": "all-linear",
    "modules_to_save": None,
}


def tiny_training(root, **over) -> dict:
    """A short training_config writing to ``root/out``; ``over`` replaces or adds keys."""
    return {
        "output_dir": str(Path(root) / "out"),
        "learning_rate": 1e-2,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 8,
        "max_steps": 8,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_steps": 4,
        "seed": 0,
        "max_seq_length": 64,
        "eval_fraction": 0.2,
        **over,
    }
