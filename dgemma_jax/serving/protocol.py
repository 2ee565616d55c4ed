"""The OpenAI-compatible request bodies the server accepts, and its error responses.

Bodies are strict: an unknown field, or a value of the wrong JSON type, is a 400 that names the
field (OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``). The diffusion
knobs (``entropy_bound``, ``max_denoising_steps``, ``t_min``, ``t_max``, ``confidence_threshold``)
and ``preview`` are extra body fields (``extra_body=`` in the openai client).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """Fields both endpoints take. ``max_tokens`` and the prompt are checked against the server's
    limits by the server (the 400 states the limit)."""

    model: str
    max_tokens: int | None = None
    stop: str | list[str] | None = Field(None, description="up to 4 strings; the text ends before the first")
    seed: int | None = Field(None, ge=0, lt=2**32, description="reproduces an output; choice i uses seed + i")
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # diffusion knobs (None = the checkpoint's generation_config.json)
    entropy_bound: float | None = Field(None, ge=0, le=1e4)
    max_denoising_steps: int | None = Field(None, ge=1, le=256)
    t_min: float | None = Field(None, ge=0, le=100)
    t_max: float | None = Field(None, gt=0, le=100)
    confidence_threshold: float | None = Field(None, ge=0, le=1e4)
    preview: bool = Field(False, description="stream: also send the canvas after every denoising step")


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None
    reasoning_content: str | None = None  # what this server returned; never fed back to the model

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatTemplateKwargs(_Strict):
    enable_thinking: bool = False


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    chat_template_kwargs: ChatTemplateKwargs | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] = Field(description="text, or token ids")
    suffix: str | None = Field(None, description="infilling: the text is written between prompt and suffix")
    echo: bool = False


class APIError(Exception):
    """An error response: HTTP ``status`` with OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def validation_message(errors) -> tuple[str, str | None]:
    """(message, param) of the first of pydantic's / FastAPI's validation errors."""
    first = errors[0]
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    # drop pydantic's union-member tags ("str", "list[...]") from the path
    loc = [x for x in loc if not (x in ("str", "int", "float", "bool") or x.startswith(("list[", "function-")))]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "json_invalid":
        return f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}", None
    if kind == "extra_forbidden":
        return f"unknown field '{param}'", param
    if kind == "missing":
        return f"missing field '{param}'", param
    if param is None:
        return f"request body: {first.get('msg')}", None
    return f"'{param}': {first.get('msg')}", param
