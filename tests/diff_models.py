"""The models of the differential tests, without PEFT or transformers: the tiny Phi-3 config (for
lora.models' Phi-3 and transformers' alike) and a custom module with nested names. Used by
tests/peft_diff.py and tests/test_entry_order.py (which runs without PEFT too)."""

from __future__ import annotations

import torch
from torch import nn

PHI3 = dict(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=32,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
    tie_word_embeddings=False,
)
PHI3_IDS = torch.tensor([[3, 5, 7, 11, 13], [2, 4, 6, 8, 10]])
CUSTOM_IDS = torch.tensor([[1, 3, 5, 7, 9], [0, 2, 4, 6, 15]])


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 8, bias=False)
        self.proj = nn.Linear(8, 8)

    def forward(self, h):
        return self.proj(self.q_proj(h) * torch.sigmoid(self.v_proj(h)))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up_proj = nn.Linear(8, 12)
        self.down_proj = nn.Linear(12, 8)

    def forward(self, h):
        return self.down_proj(torch.tanh(self.up_proj(h)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = Attn()
        self.mlp = MLP()
        self.norm = nn.LayerNorm(8)

    def forward(self, h):
        return self.norm(h + self.self_attn(h) + self.mlp(h))


class Custom(nn.Module):
    """Nested Linears (names that are suffixes of one another: ``proj``/``q_proj``, ``head``/
    ``lm_head``), an Embedding, a Conv1d, a Conv2d, and an output head tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.image = nn.Conv2d(1, 2, 3, padding=1)
        self.layers = nn.ModuleList(Block() for _ in range(2))
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 16, bias=False)
        self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        h = self.embed(ids)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        h = h + self.image(h.unsqueeze(1)).mean(1)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(torch.tanh(self.head(self.proj(h))))
