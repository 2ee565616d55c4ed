"""Chat prompts: a checkpoint's own jinja chat template, the thought channel, and a conversation.

The template is rendered the way transformers' ``apply_chat_template`` renders it (sandboxed jinja2,
``trim_blocks``/``lstrip_blocks``, a ``raise_exception`` global), so a snapshot's
``chat_template.jinja`` gives the same prompt here as there. ``ChatTemplate.default()`` is our own
Gemma 4 template, shipped with the package.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"

_THOUGHT = re.compile(r"<\|channel>thought\n?(.*?)(?:<channel\|>|\Z)", re.S)
_CHANNEL_MARKERS = re.compile(r"<\|channel>|<channel\|>")
_END_OF_ANSWER = ("<turn|>", "<eos>")


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    """A jinja chat template. ``render(messages)`` returns the prompt text (special tokens as text)."""

    def __init__(self, source: str, name: str = "<template>"):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols])
        env.globals["raise_exception"] = _raise_exception
        env.filters["tojson"] = _tojson
        self.name = name
        self.source = source
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise ValueError(f"{name}: chat template has a syntax error at line {e.lineno}: {e.message}") from e

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ChatTemplate:
        """The template of a snapshot: ``chat_template.jinja``, else ``chat_template`` in
        ``tokenizer_config.json``. FileNotFoundError naming the directory when it has neither."""
        directory = Path(directory)
        file = directory / TEMPLATE_FILE
        if file.is_file():
            return cls(file.read_text(encoding="utf-8"), str(file))
        config = directory / CONFIG_FILE
        if config.is_file():
            try:
                template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
            except ValueError as e:
                raise ValueError(f"{config}: not valid JSON ({e})") from e
            if isinstance(template, list):  # [{"name": ..., "template": ...}], as HF writes several
                template = {t.get("name"): t.get("template") for t in template}.get("default")
            if isinstance(template, str):
                return cls(template, f"{config}:chat_template")
        raise FileNotFoundError(f"{directory}: no chat template (expected {TEMPLATE_FILE} or a "
                                f"'chat_template' entry in {CONFIG_FILE})")

    @classmethod
    def default(cls) -> ChatTemplate:
        """Our Gemma 4 template (``dgemma_jax/assets/chat_template.jinja``)."""
        text = resources.files("dgemma_jax").joinpath("assets", TEMPLATE_FILE).read_text(encoding="utf-8")
        return cls(text, f"dgemma_jax/assets/{TEMPLATE_FILE}")

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
               enable_thinking: bool = False, bos_token: str = "<bos>", **variables: Any) -> str:
        """The prompt for ``messages`` (dicts with ``role`` and ``content``). ``variables`` reach the
        template as they do with transformers (e.g. ``tools``). Template errors raise ValueError."""
        try:
            return self._template.render(messages=[dict(m) for m in messages],
                                         add_generation_prompt=add_generation_prompt,
                                         enable_thinking=enable_thinking, bos_token=bos_token, **variables)
        except jinja2.TemplateError as e:
            raise ValueError(f"{self.name}: {e}") from e


def split_thoughts(text: str) -> tuple[str, str]:
    """(answer, thoughts) of raw model output.

    Thoughts are the contents of ``<|channel>thought\\n ... <channel|>`` blocks (an unterminated
    block runs to the end), joined by blank lines. The answer is the rest, cut at the end of the
    turn (``<turn|>`` or ``<eos>``), without channel markers, stripped.
    """
    for marker in _END_OF_ANSWER:
        text = text.split(marker, 1)[0]
    thoughts = [m.group(1).strip() for m in _THOUGHT.finditer(text)]
    answer = _CHANNEL_MARKERS.sub("", _THOUGHT.sub("", text)).strip()
    return answer, "\n\n".join(t for t in thoughts if t)


class Conversation:
    """A chat history that renders the next prompt and keeps thoughts out of the history.

    Usage: ``prompt = chat.prompt("Hello")`` (text to tokenize and generate from), then
    ``answer = chat.add_reply(raw_output)`` (the visible answer; the history keeps it without thoughts).
    """

    def __init__(self, template: ChatTemplate, system: str | None = None, enable_thinking: bool = False,
                 bos_token: str = "<bos>"):
        self.template = template
        self.enable_thinking = enable_thinking
        self.bos_token = bos_token
        self.messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []

    def prompt(self, user_text: str) -> str:
        """Appends the user turn and returns the prompt that asks the model for its reply."""
        self.messages.append({"role": "user", "content": user_text})
        return self.template.render(self.messages, add_generation_prompt=True,
                                    enable_thinking=self.enable_thinking, bos_token=self.bos_token)

    def add_reply(self, raw_model_text: str) -> str:
        """Stores the model's reply (thoughts stripped) and returns its visible answer."""
        answer, _ = split_thoughts(raw_model_text)
        self.messages.append({"role": "assistant", "content": answer})
        return answer
