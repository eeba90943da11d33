"""Chat templates: the real Phi-3, Phi-3.5 and Phi-4-mini templates, rendered and labelled, and
compared with transformers' own ``apply_chat_template`` when transformers is installed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora.data import (
    IGNORE_INDEX,
    PHI3_CHAT_TEMPLATE,
    ChatTemplate,
    ChatTemplateError,
    Tokenizer,
    select_chat_template,
    tokenize_conversation,
)

# The chat-relevant part of each checkpoint's tokenizer_config.json, copied verbatim.
# microsoft/Phi-3-mini-4k-instruct
PHI3_MINI_4K = {
    "bos_token": "<s>",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "unk_token": "<unk>",
    "chat_template": "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}",  # noqa: E501
}
# microsoft/Phi-3.5-mini-instruct
PHI35_MINI = {
    "bos_token": "<s>",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "unk_token": "<unk>",
    "chat_template": "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}",  # noqa: E501
}
# microsoft/Phi-4-mini-instruct
PHI4_MINI = {
    "bos_token": "<|endoftext|>",
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "chat_template": "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}",  # noqa: E501
}
CONFIGS = {"phi3-mini-4k": PHI3_MINI_4K, "phi3.5-mini": PHI35_MINI, "phi4-mini": PHI4_MINI}

CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
]
PHI3_TEXT = (
    "<|system|>\nYou are terse.<|end|>\n<|user|>\nHello!<|end|>\n<|assistant|>\nHi.<|end|>\n"
    "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n4<|end|>\n<|endoftext|>"
)
PHI4_TEXT = (
    "<|system|>You are terse.<|end|><|user|>Hello!<|end|><|assistant|>Hi.<|end|>"
    "<|user|>What is 2+2?<|end|><|assistant|>4<|end|><|endoftext|>"
)
EXPECTED = {
    "phi3-mini-4k": (
        PHI3_TEXT,
        "<|system|>\nYou are terse.<|end|>\n<|user|>\nHello!<|end|>\n<|assistant|>\n",
    ),
    "phi3.5-mini": (
        PHI3_TEXT,
        "<|system|>\nYou are terse.<|end|>\n<|user|>\nHello!<|end|>\n<|assistant|>\n",
    ),
    "phi4-mini": (PHI4_TEXT, "<|system|>You are terse.<|end|><|user|>Hello!<|end|><|assistant|>"),
}
SPECIALS = [
    "<|endoftext|>",
    "<|assistant|>",
    "<|system|>",
    "<|end|>",
    "<|user|>",
    "<|tool|>",
    "<|/tool|>",
]


def _tiny_tokenizer_json(path: Path) -> Path:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(
        ["You are terse. Hello! Hi. What is 2+2? the cat sat on the mat"] * 10, trainer
    )
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    return _tiny_tokenizer_json(tmp_path_factory.mktemp("tok") / "tokenizer.json")


def _checkpoint(directory: Path, tokenizer_file: Path, config: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_real_templates_render_the_expected_text(name):
    template = ChatTemplate.from_tokenizer_config(CONFIGS[name])
    full, prompt = EXPECTED[name]
    assert template.render(CHAT) == full
    assert template.render(CHAT[:2], add_generation_prompt=True) == prompt


def test_phi35_drops_an_empty_system_message_and_phi3_keeps_it():
    chat = [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}]
    assert (
        ChatTemplate.from_tokenizer_config(PHI35_MINI).render(chat, True)
        == "<|user|>\nHi<|end|>\n<|assistant|>\n"
    )
    assert (
        ChatTemplate.from_tokenizer_config(PHI3_MINI_4K)
        .render(chat, True)
        .startswith("<|system|>\n<|end|>\n")
    )


def test_phi4_mini_renders_tools_in_the_system_turn():
    chat = [
        {"role": "system", "content": "Sys", "tools": '[{"name": "f"}]'},
        {"role": "user", "content": "Hi"},
    ]
    text = ChatTemplate.from_tokenizer_config(PHI4_MINI).render(chat, add_generation_prompt=True)
    assert (
        text == '<|system|>Sys<|tool|>[{"name": "f"}]<|/tool|><|end|><|user|>Hi<|end|><|assistant|>'
    )


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_labels_cover_each_assistant_reply_and_its_end_token_for_every_template(
    name, tokenizer_file, tmp_path
):
    tok = Tokenizer.from_pretrained(_checkpoint(tmp_path / name, tokenizer_file, CONFIGS[name]))
    out = tokenize_conversation(CHAT, tok)
    assert out.text == EXPECTED[name][0]
    runs, current = [], []
    for _token_id, label in zip(out.input_ids + [None], out.labels + [IGNORE_INDEX]):
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(tok.decode(current))
            current = []
    assert runs == ["Hi.<|end|>", "4<|end|>"]


def test_a_list_of_named_templates_uses_default():
    entries = [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "DEFAULT"},
    ]
    assert select_chat_template(entries) == "DEFAULT"
    assert ChatTemplate.from_tokenizer_config({"chat_template": entries}).render([]) == "DEFAULT"
    with pytest.raises(ValueError, match=r"no entry named 'default'; it has \['tool_use'\]"):
        select_chat_template(entries[:1])
    with pytest.raises(ValueError, match="chat_template is a int"):
        select_chat_template(3)


def test_template_falls_back_to_a_jinja_file_then_to_phi3(tmp_path):
    assert ChatTemplate.from_pretrained(tmp_path).source == PHI3_CHAT_TEMPLATE
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert ChatTemplate.from_pretrained(tmp_path).render([{"role": "user", "content": "x"}]) == "x!"


def test_special_tokens_stored_as_added_token_objects_are_template_variables():
    config = {
        "eos_token": {"content": "<|endoftext|>", "__type": "AddedToken"},
        "chat_template": "{{ eos_token }}",
    }
    assert ChatTemplate.from_tokenizer_config(config).render([]) == "<|endoftext|>"


def test_template_environment_matches_transformers_conventions():
    # trim_blocks / lstrip_blocks: block tags leave no newline or indentation behind.
    source = "{% for m in messages %}\n    {{ m['content'] | tojson }}\n{% endfor %}"
    assert ChatTemplate(source).render([{"role": "user", "content": "é<b>"}]) == '    "é<b>"\n'
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        ChatTemplate("{{ raise_exception('roles must alternate') }}").render([])
    # {% generation %} blocks (used for assistant masks by some templates) render their body.
    assert ChatTemplate("{% generation %}A{% endgeneration %}").render([]) == "A"


def test_templates_are_sandboxed():
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}").render([])
    with pytest.raises(ChatTemplateError):  # immutable: no mutating the caller's data
        ChatTemplate("{{ messages.append(1) }}").render([])
    with pytest.raises(ChatTemplateError, match="does not compile"):
        ChatTemplate("{% for %}")


# ---------------------------------------------------------------------------------------------------
# Against transformers
# ---------------------------------------------------------------------------------------------------

_content = st.text(
    alphabet=st.sampled_from(list("abc XYZ\n.!?é中")), min_size=1, max_size=12
).filter(str.strip)


@st.composite
def chats(draw):
    messages = [{"role": "system", "content": draw(_content)}] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(1, 3))):
        messages += [
            {"role": "user", "content": draw(_content)},
            {"role": "assistant", "content": draw(_content)},
        ]
    return messages


@pytest.fixture(scope="module")
def hf_tokenizers(tokenizer_file):
    transformers = pytest.importorskip("transformers")
    out = {}
    for name, config in CONFIGS.items():
        specials = {k: config[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        out[name] = transformers.PreTrainedTokenizerFast(
            tokenizer_file=str(tokenizer_file), **specials
        )
    return out


@pytest.fixture(scope="module")
def our_tokenizers(tokenizer_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    return {
        name: Tokenizer.from_pretrained(
            _checkpoint(root / name.replace(".", "_"), tokenizer_file, config)
        )
        for name, config in CONFIGS.items()
    }


@pytest.mark.parametrize("name", sorted(CONFIGS))
@settings(max_examples=10)
@given(messages=chats(), add_generation_prompt=st.booleans())
def test_rendering_and_token_ids_match_transformers(
    name, hf_tokenizers, our_tokenizers, messages, add_generation_prompt
):
    hf, ours = hf_tokenizers[name], our_tokenizers[name]
    if add_generation_prompt:
        messages = messages[:-1]
    template = CONFIGS[name]["chat_template"]
    expected_text = hf.apply_chat_template(
        messages,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
    assert (
        ours.apply_chat_template(messages, add_generation_prompt, tokenize=False) == expected_text
    )
    expected_ids = hf.apply_chat_template(
        messages,
        chat_template=template,
        tokenize=True,
        add_generation_prompt=add_generation_prompt,
        return_dict=False,
    )
    assert ours.apply_chat_template(messages, add_generation_prompt) == list(expected_ids)
