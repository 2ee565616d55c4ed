"""Chat template (ours and a checkpoint's), thought channel, conversation history."""

import json

import pytest

from dgemma_jax.chat import ChatTemplate, Conversation, split_thoughts
from dgemma_jax.tokenizer import Tokenizer
from tests.tokenizer_files import write_sentencepiece, write_tokenizer_json

PORTUGAL = [{"role": "user", "content": "Write a long essay about Portugal."}]
RELEASED_PROMPT = ("<bos><|turn>user\nWrite a long essay about Portugal.<turn|>\n<|turn>model\n"
                   "<|channel>thought\n<channel|>")
HISTORY = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Capital of Portugal?"},
]


@pytest.fixture(scope="module")
def template():
    return ChatTemplate.default()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    write_tokenizer_json(d)
    (d / "chat_template.jinja").write_text(ChatTemplate.default().source)
    return d


def test_user_message_matches_released_template(template):
    assert template.render(PORTUGAL) == RELEASED_PROMPT
    assert template.render(PORTUGAL, add_generation_prompt=False) == RELEASED_PROMPT.split("<|turn>model")[0]


def test_system_turn_and_thinking(template):
    assert template.render(PORTUGAL, enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nWrite a long essay about Portugal.<turn|>\n"
        "<|turn>model\n")
    assert template.render(HISTORY, enable_thinking=True) == (
        "<bos><|turn>system\n<|think|>\nYou are terse.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\nHello.<turn|>\n"
        "<|turn>user\nCapital of Portugal?<turn|>\n<|turn>model\n")
    assert template.render(HISTORY).startswith("<bos><|turn>system\nYou are terse.<turn|>\n<|turn>user\n")


@pytest.mark.parametrize("messages", [
    [{"role": "tool", "content": "x"}],
    [{"role": "user", "content": "x"}, {"role": "system", "content": "late"}],
])
def test_bad_role_raises(template, messages):
    with pytest.raises(ValueError, match="roles must be"):
        template.render(messages)


def test_split_thoughts():
    raw = "<|channel>thought\nLet me see.<channel|>Lisbon.<turn|><pad><pad>"
    assert split_thoughts(raw) == ("Lisbon.", "Let me see.")
    assert split_thoughts("<|channel>thought\nStill going") == ("", "Still going")
    assert split_thoughts("  Lisbon.\n") == ("Lisbon.", "")
    assert split_thoughts("<|channel>thought\n<channel|>Lisbon.<eos>") == ("Lisbon.", "")


def test_conversation_strips_thoughts_from_history(template):
    chat = Conversation(template, system="You are terse.", enable_thinking=True)
    chat.prompt("Hi")
    assert chat.add_reply("<|channel>thought\nA greeting.<channel|>Hello.<turn|>") == "Hello."
    prompt = chat.prompt("Capital of Portugal?")
    assert prompt == template.render(HISTORY, enable_thinking=True)
    assert "A greeting" not in prompt and chat.messages[2] == {"role": "assistant", "content": "Hello."}


def test_load_from_directory(tmp_path, template):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        ChatTemplate.load(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template.source}))
    assert ChatTemplate.load(tmp_path).render(PORTUGAL) == RELEASED_PROMPT
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}{{ messages[0]['content'] }}")
    assert ChatTemplate.load(tmp_path).render(PORTUGAL) == "<bos>Write a long essay about Portugal."
    (tmp_path / "chat_template.jinja").write_text("{% if %}")
    with pytest.raises(ValueError, match="chat_template.jinja"):
        ChatTemplate.load(tmp_path)


@pytest.mark.parametrize("source", ["{{ messages.__class__.__mro__ }}", "{{ messages.append(1) }}"])
def test_sandboxed_and_immutable(source):
    with pytest.raises(ValueError, match="unsafe"):
        ChatTemplate(source).render(PORTUGAL)


@pytest.mark.parametrize("backend", ["sp", "hf"])
def test_prompt_special_tokens_are_single_ids(backend, hf_dir, tmp_path, template):
    tok = Tokenizer.load(write_sentencepiece(tmp_path).parent if backend == "sp" else hf_dir)
    ids = tok.encode(template.render(HISTORY, enable_thinking=True))
    assert ids[:2] == [2, 105] and ids.count(105) == 5 and ids.count(106) == 4
    assert ids.count(98) == 1 and tok.decode(ids) == template.render(HISTORY, enable_thinking=True)


@pytest.mark.parametrize("thinking", [False, True])
def test_same_render_as_transformers(hf_dir, template, thinking):
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"), bos_token="<bos>",
                                              eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    hf.chat_template = (hf_dir / "chat_template.jinja").read_text()
    for messages in (PORTUGAL, HISTORY):
        theirs = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)
        ours = ChatTemplate.load(hf_dir).render(messages, enable_thinking=thinking)
        assert ours == theirs
        assert Tokenizer.load(hf_dir).encode(ours) == hf.encode(theirs, add_special_tokens=False)
