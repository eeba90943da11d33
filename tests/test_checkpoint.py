"""Checkpoint directories: safetensors only, sharding like transformers, strict name/shape checks,
meta-device loading, and interchange with transformers' own save_pretrained / from_pretrained."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny import TINY_PHI3 as TINY

import lora.models.checkpoint as ckpt
from lora.models import Phi3Config, Phi3ForCausalLM
from lora.models.checkpoint import CheckpointError, parse_size

PHI4_MINI_LIKE = dict(
    TINY,
    num_key_value_heads=1,
    partial_rotary_factor=0.75,
    tie_word_embeddings=True,
    max_position_embeddings=64,
    original_max_position_embeddings=16,
    rope_scaling={
        "type": "longrope",
        "short_factor": [1.0, 1.1, 1.2],
        "long_factor": [2.0, 3.0, 5.0],
    },
)


def tiny(**overrides) -> Phi3ForCausalLM:
    return Phi3ForCausalLM(Phi3Config(**{**TINY, **overrides})).eval()


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


IDS = torch.tensor([[5, 17, 33, 8, 90, 41, 12], [7, 7, 64, 3, 25, 81, 50]])


@pytest.mark.parametrize(
    "size, expected",
    [
        (1234, 1234),
        ("2GB", 2 * 10**9),
        ("500MB", 500 * 10**6),
        ("2GiB", 2 * 2**30),
        ("10KB", 10_000),
        ("0.5GB", 5 * 10**8),
        ("4096", 4096),
    ],
)
def test_parse_size(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["2XB", "", "GB", 0, -5, 1.5, True])
def test_parse_size_rejects_nonsense(size):
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size(size)


def test_single_file_round_trip(tmp_path):
    model = tiny()
    written = model.save_pretrained(tmp_path)
    assert written == [tmp_path / "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "model.safetensors",
    ]  # no temp files left
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and config["architectures"] == ["Phi3ForCausalLM"]
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    loaded = Phi3ForCausalLM.from_pretrained(tmp_path)
    assert not loaded.training
    written_keys = {"torch_dtype", "architectures"}
    assert {
        k: v for k, v in loaded.config.to_dict().items() if k not in written_keys
    } == model.config.to_dict()
    assert all(p.device.type == "cpu" and p.requires_grad for p in loaded.parameters())
    assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_sharded_round_trip_writes_a_transformers_index(tmp_path):
    model = tiny()
    written = model.save_pretrained(tmp_path, max_shard_size=20_000)
    n = len(written)
    assert n > 2 and [p.name for p in written] == [
        f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)
    ]
    assert all(
        p.stat().st_size <= 20_000 + 4096 for p in written
    )  # + header; no tensor here exceeds the limit
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    state = model.state_dict()
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in state.values()
    )
    assert set(index["weight_map"]) == set(state)
    for name, file in index["weight_map"].items():
        assert name in load_file(tmp_path / file)
    loaded = Phi3ForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_resaving_removes_stale_weight_files(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    model.save_pretrained(tmp_path, max_shard_size=30_000)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names


def test_tied_checkpoint_has_no_lm_head_and_loads_tied(tmp_path):
    model = Phi3ForCausalLM(Phi3Config(**PHI4_MINI_LIKE)).eval()
    model.save_pretrained(tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    loaded = Phi3ForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def rewrite(path, change):
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda t: t.pop("model.layers.1.mlp.down_proj.weight"),
            r"1 missing tensor\(s\): model\.layers\.1\.mlp\.down_proj\.weight",
        ),
        (
            lambda t: t.update({"model.layers.0.self_attn.q_proj.weight": torch.zeros(2)}),
            r"unexpected tensor\(s\): model\.layers\.0\.self_attn\.q_proj\.weight",
        ),
        (
            lambda t: t.update({"model.norm.weight": torch.ones(31)}),
            r"model\.norm\.weight: checkpoint \(31,\), model \(32,\)",
        ),
    ],
)
def test_mismatched_tensors_are_named_before_anything_loads(tmp_path, monkeypatch, change, message):
    tiny().save_pretrained(tmp_path)
    rewrite(tmp_path / "model.safetensors", change)
    assigned = []
    monkeypatch.setattr(ckpt, "_assign", lambda *a: assigned.append(a))
    with pytest.raises(CheckpointError, match=message):
        Phi3ForCausalLM.from_pretrained(tmp_path)
    assert assigned == []


def test_old_rotary_buffers_in_a_checkpoint_are_ignored(tmp_path):
    model = tiny()
    model.save_pretrained(tmp_path)
    rewrite(
        tmp_path / "model.safetensors",
        lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}),
    )
    assert torch.equal(Phi3ForCausalLM.from_pretrained(tmp_path)(IDS).logits, model(IDS).logits)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        Phi3ForCausalLM.from_pretrained(tmp_path)
    Phi3Config(**TINY).save(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(
        FileNotFoundError, match=r"model\.safetensors.*pytorch_model\.bin.*never read"
    ):
        Phi3ForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        Phi3ForCausalLM.from_pretrained(tmp_path / "nope")


def test_index_naming_a_missing_shard_is_an_error(tmp_path):
    tiny().save_pretrained(tmp_path, max_shard_size=20_000)
    (tmp_path / "model-00002-of-00004.safetensors").unlink(missing_ok=True)
    next(p for p in sorted(tmp_path.glob("model-*.safetensors"))).unlink()
    with pytest.raises(FileNotFoundError, match="lists shard"):
        Phi3ForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "config_dtype, argument, expected",
    [
        ("bfloat16", None, torch.bfloat16),
        ("bfloat16", "auto", torch.bfloat16),
        ("bfloat16", torch.float32, torch.float32),
        (None, None, torch.float32),
        (None, "float16", torch.float16),
        (None, "torch.bfloat16", torch.bfloat16),
    ],
)
def test_dtype_resolution(tmp_path, config_dtype, argument, expected):
    tiny().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("torch_dtype")
    if config_dtype:
        config["dtype"] = config_dtype  # the transformers-5 key
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = Phi3ForCausalLM.from_pretrained(tmp_path, dtype=argument)
    assert {p.dtype for p in loaded.parameters()} == {expected}
    assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32


def test_bad_dtype_is_named(tmp_path):
    tiny().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="dtype='int8'"):
        Phi3ForCausalLM.from_pretrained(tmp_path, dtype="int8")
    with pytest.raises(ValueError, match="dtype=torch.int8"):
        Phi3ForCausalLM.from_pretrained(tmp_path, dtype=torch.int8)


def test_from_pretrained_never_materialises_a_random_init_nor_unpickles(tmp_path, monkeypatch):
    tiny().save_pretrained(tmp_path)
    seen = []
    real_init = Phi3ForCausalLM._init_weights
    monkeypatch.setattr(
        Phi3ForCausalLM,
        "_init_weights",
        lambda self, m: (
            seen.extend(p.device.type for p in m.parameters(recurse=False)) or real_init(self, m)
        ),
    )

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_pickle)
    Phi3ForCausalLM.from_pretrained(tmp_path)
    assert seen and set(seen) == {"meta"}


def test_transformers_reads_what_we_save(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    for name, config, shard in [("gqa", TINY, "5GB"), ("tied", PHI4_MINI_LIKE, 20_000)]:
        ours = Phi3ForCausalLM(Phi3Config(**config)).eval()
        ours.save_pretrained(tmp_path / name, max_shard_size=shard)
        theirs = transformers.Phi3ForCausalLM.from_pretrained(
            tmp_path / name, attn_implementation="sdpa"
        ).eval()
        with torch.no_grad():
            assert max_diff(theirs(IDS).logits, ours(IDS).logits) <= 1e-5, name


def test_we_read_what_transformers_saves(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    for name, config, shard in [("gqa", TINY, "5GB"), ("tied", PHI4_MINI_LIKE, "20KB")]:
        hf_config = transformers.Phi3Config(**config)
        hf_config._attn_implementation = "sdpa"
        theirs = transformers.Phi3ForCausalLM(hf_config).eval()
        theirs.save_pretrained(tmp_path / name, max_shard_size=shard)
        ours = Phi3ForCausalLM.from_pretrained(tmp_path / name)
        with torch.no_grad():
            assert max_diff(ours(IDS).logits, theirs(IDS).logits) <= 1e-5, name
