"""The demo's committed assets: regenerable, loadable by the real loaders, valid, and a fair test."""

from __future__ import annotations

import json

import pytest
import torch

import lora.demo as demo
from lora.data import PHI3_CHAT_TEMPLATE, Tokenizer, load_conversations, prepare_chat_data
from lora.demo import skill
from tools.demo_assets import build
from tools.demo_assets.corpus import make_corpus

pytestmark = pytest.mark.skipif(
    demo.missing_assets() != [], reason="demo assets not built (python -m tools.demo_assets.build)"
)


def _jsonl(records) -> str:
    return "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in records)


def test_committed_chat_data_is_what_the_generator_makes():
    train, evals = build.chat_records(build.SEED)
    assert demo.train_file().read_text(encoding="utf-8") == _jsonl(train)
    assert demo.eval_file().read_text(encoding="utf-8") == _jsonl(evals)


def test_committed_corpus_is_what_the_generator_makes():
    stories = make_corpus(build.NUM_STORIES, build.SEED)
    assert demo.corpus_file().read_text(encoding="utf-8") == "".join(s + "\n" for s in stories)


def test_build_writes_the_chat_data_deterministically(tmp_path):
    build.build(tmp_path, only=["chat"], log=lambda _: None)
    assert (tmp_path / "chat_train.jsonl").read_bytes() == demo.train_file().read_bytes()
    assert (tmp_path / "chat_eval.jsonl").read_bytes() == demo.eval_file().read_bytes()


def test_chat_data_passes_the_validator_and_fits_the_demo_sequence_length():
    train, errors = load_conversations(demo.train_file(), on_error="raise")
    evals, _ = load_conversations(demo.eval_file(), on_error="raise")
    assert errors == [] and len(train) >= 2000 and len(evals) >= 150
    assert any(c.messages[0]["role"] == "system" for c in train)
    assert any(sum(m["role"] == "assistant" for m in c.messages) > 1 for c in train)
    tokenizer = Tokenizer.from_pretrained(demo.base_model_dir())
    data = prepare_chat_data(demo.train_file(), tokenizer, 128, eval_file=demo.eval_file())
    assert data.train_stats.truncated == data.train_stats.dropped == data.eval_stats.truncated == 0
    assert len(data.train) == len(train) and len(data.eval) == len(evals)


def _asked_numbers(path) -> list[int]:
    """The numbers the conversations of a file ask about (each assistant answer is that number + 1)."""
    return [
        skill.read_answer(m["content"]) - 1
        for line in path.read_text().splitlines()
        for m in json.loads(line)["messages"]
        if m["role"] == "assistant"
    ]


def test_eval_numbers_never_appear_in_training_and_prompts_do_not_overlap():
    train_numbers, eval_numbers = (
        set(_asked_numbers(demo.train_file())),
        set(_asked_numbers(demo.eval_file())),
    )
    assert (
        train_numbers.isdisjoint(eval_numbers) and len(eval_numbers) == build.NUM_EVAL_CONVERSATIONS
    )

    def prompts(path):
        return {
            m["content"]
            for line in path.read_text().splitlines()
            for m in json.loads(line)["messages"]
            if m["role"] == "user"
        }

    assert prompts(demo.train_file()).isdisjoint(prompts(demo.eval_file()))
    for messages, reference in skill.eval_pairs(demo.eval_file()):
        asked = skill.read_answer(reference) - 1
        assert (
            messages[-1]["role"] == "user"
            and skill.number_to_words(asked) in messages[-1]["content"].lower()
        )


def test_base_checkpoint_is_a_phi3_directory_in_the_real_format():
    base = demo.base_model_dir()
    config = json.loads((base / "config.json").read_text())
    assert config["model_type"] == "phi3" and config["architectures"] == ["Phi3ForCausalLM"]
    tok_config = json.loads((base / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == PHI3_CHAT_TEMPLATE
    assert (tok_config["bos_token"], tok_config["eos_token"], tok_config["unk_token"]) == (
        "<s>",
        "<|endoftext|>",
        "<unk>",
    )
    tokenizer = Tokenizer.from_pretrained(base)
    assert tokenizer.vocab_size <= config["vocab_size"]
    for token in build.PHI3_SPECIAL_TOKENS:
        assert len(tokenizer.encode(token)) == 1
    assert [tokenizer.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]  # as in Phi-3
    end = tokenizer.token_to_id("<|end|>")
    assert end in tokenizer.stop_token_ids and config["eos_token_id"] == tokenizer.eos_token_id


def test_tokenizer_and_template_round_trip():
    tokenizer = Tokenizer.from_pretrained(demo.base_model_dir())
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What comes after forty-two?"},
        {"role": "assistant", "content": "It is forty-three."},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|system|>\nBe brief.<|end|>\n<|user|>\nWhat comes after forty-two?<|end|>\n"
        "<|assistant|>\nIt is forty-three.<|end|>\n<|endoftext|>"
    )
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert [tokenizer.decode([i]) for i in tokenizer.encode("342")] == [
        "3",
        "4",
        "2",
    ]  # digits one by one


def test_base_model_loads_with_the_real_loader_and_cannot_do_the_skill_yet():
    from lora.models import Phi3ForCausalLM

    base = demo.base_model_dir()
    model = Phi3ForCausalLM.from_pretrained(base, dtype=torch.float32)
    tokenizer = Tokenizer.from_pretrained(base)
    # It knows the language: a story continues with low loss.
    story = demo.corpus_file().read_text().splitlines()[-1]
    ids = torch.tensor([tokenizer.encode(story)])
    assert model(ids, labels=ids).loss.item() < 2.5
    # It cannot do the skill: greedy replies to held-out prompts score 0.
    pairs = skill.eval_pairs(demo.eval_file())[:8]
    total = 0.0
    for messages, reference in pairs:
        prompt = torch.tensor([tokenizer.apply_chat_template(messages, add_generation_prompt=True)])
        out = model.generate(
            prompt, max_new_tokens=6, temperature=0, eos_token_id=tokenizer.stop_token_ids
        )
        total += skill.score(
            tokenizer.decode(out[0, prompt.shape[1] :], skip_special_tokens=True), reference
        )
    assert total == 0.0


def test_number_words_and_score():
    assert [skill.number_to_words(n) for n in (1, 13, 40, 42, 100, 305, 342, 999)] == [
        "one",
        "thirteen",
        "forty",
        "forty-two",
        "one hundred",
        "three hundred and five",
        "three hundred and forty-two",
        "nine hundred and ninety-nine",
    ]
    assert all(skill.words_to_number(skill.number_to_words(n)) == n for n in range(1000))
    with pytest.raises(ValueError, match="n=1000"):
        skill.number_to_words(1000)
    with pytest.raises(ValueError, match="words='forty two'"):
        skill.words_to_number("forty two")
    assert (
        skill.make_answer(42) == "It is forty-three."
        and skill.read_answer(" it is Forty-three") == 43
    )
    with pytest.raises(ValueError, match="expected 'It is <number in words>.'"):
        skill.read_answer("forty-three")
    reference = "It is forty-three."
    assert (
        skill.score("It is forty-three.", reference)
        == skill.score(" it is  Forty-three\n", reference)
        == 1.0
    )
    assert (
        skill.score("It is forty-four.", reference) == skill.score("It is forty.", reference) == 0.0
    )
    assert skill.score("", reference) == skill.score("forty-three", reference) == 0.0


def test_conversations_are_deterministic_and_only_use_the_given_numbers():
    a = skill.make_conversations([5, 6], 50, seed=1)
    assert a == skill.make_conversations([5, 6], 50, seed=1)
    assert {m["content"] for c in a for m in c["messages"] if m["role"] == "assistant"} <= {
        "It is six.",
        "It is seven.",
    }
    train, held_out = skill.split_numbers(100, seed=3)
    assert (
        len(held_out) == 100
        and set(train).isdisjoint(held_out)
        and len(train) + 100 == len(skill.NUMBER_RANGE)
    )
    with pytest.raises(ValueError, match=r"numbers contains \[999\]"):
        skill.make_conversations([999], 1, seed=0)


def test_ensure_assets_builds_nothing_when_everything_is_there():
    messages = []
    assert demo.ensure_assets(log=messages.append) == demo.assets_dir()
    assert messages == [] and demo.missing_assets() == []


def test_committed_tokenizer_is_what_the_build_trains_on_the_corpus(tmp_path):
    import tokenizers

    built_with = json.loads((demo.base_model_dir() / "build_info.json").read_text()).get(
        "tokenizers"
    )
    if built_with != tokenizers.__version__:
        pytest.skip(f"assets built with tokenizers {built_with}, this is {tokenizers.__version__}")
    build.build_tokenizer(demo.corpus_file(), tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / name).read_bytes() == (demo.base_model_dir() / name).read_bytes()


def test_transformers_loads_the_base_checkpoint_and_agrees(monkeypatch):
    transformers = pytest.importorskip("transformers")
    from lora.models import Phi3ForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a local directory: nothing may be downloaded
    base = str(demo.base_model_dir())
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    tokenizer = Tokenizer.from_pretrained(base)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What comes after forty-two?"},
    ]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert (
        list(
            hf_tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_dict=False
            )
        )
        == ids
    )
    x = torch.tensor([ids])
    torch.testing.assert_close(
        hf_model(x).logits, Phi3ForCausalLM.from_pretrained(base, dtype=torch.float32)(x).logits
    )
