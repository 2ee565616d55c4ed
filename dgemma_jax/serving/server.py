"""An OpenAI-compatible HTTP server over the continuous-batching engine (FastAPI on uvicorn).

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` (``suffix`` = infilling),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text). Streaming is server-sent
events, one chunk per committed canvas; with ``"preview": true`` also a chunk after every denoising
step whose ``delta`` is empty and whose ``preview`` field holds the canvas so far.

Every request is checked before it reaches the engine: bad JSON, unknown fields and wrong types are
400s naming the field; prompts and ``max_tokens`` over the server's limits are 400s stating the
limit; an unknown model is a 404; a full queue is a 429. A request past ``request_timeout`` gets a
408 (or an error event when streaming) and leaves its slot; a client that disconnects has its
request cancelled at the next canvas boundary.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from dgemma_jax.chat import ChatTemplate, split_thoughts
from dgemma_jax.generation import FREE
from dgemma_jax.sampling import SamplerConfig
from dgemma_jax.serving import engine as eng
from dgemma_jax.serving.metrics import Metrics
from dgemma_jax.serving.protocol import (APIError, ChatCompletionRequest, CompletionRequest, _Sampling,
                                         validation_message)
from dgemma_jax.tokenizer import Tokenizer

KNOBS = ("entropy_bound", "max_denoising_steps", "t_min", "t_max", "confidence_threshold")


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    model_name: str = "dgemma"
    request_timeout: float = 600.0  # seconds from arrival to the last token
    default_max_tokens: int | None = None  # chat; None = the checkpoint's max_new_tokens, else 256
    completion_max_tokens: int = 16  # /v1/completions without max_tokens (OpenAI's default)


class _Choices:
    """The ``n`` engine requests of one HTTP request; their events arrive, tagged with the choice
    index, on one queue of the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.handles: list[eng.Handle] = []

    def listener(self, index: int):
        def on_event(event) -> None:  # engine thread
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, (index, event))
            except RuntimeError:  # the loop is closed: the server is shutting down
                pass
        return on_event

    def __len__(self) -> int:
        return len(self.handles)

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()

    async def next(self, deadline: float, request: Request) -> tuple[int, Any]:
        """The next (choice, event). Raises TimeoutError past ``deadline``, ConnectionAbortedError
        when the client has gone."""
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                raise TimeoutError
            try:
                return await asyncio.wait_for(self.events.get(), timeout=min(left, 0.5))
            except TimeoutError:
                if await request.is_disconnected():
                    raise ConnectionAbortedError from None


class Server:
    """The app's state: engine, tokenizer, chat template and metrics. ``app`` is the ASGI app."""

    def __init__(self, engine: eng.Engine, tokenizer: Tokenizer, template: ChatTemplate | None,
                 config: ServerConfig = ServerConfig()):
        self.engine, self.tokenizer, self.template, self.config = engine, tokenizer, template, config
        self.metrics = Metrics(engine)
        self.created = int(time.time())
        self.app = self._build_app()

    # ---- app ---------------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        app = FastAPI(title="dgemma-jax", version="0.1.0",
                      description="OpenAI-compatible block-diffusion text generation (DiffusionGemma).")

        @app.exception_handler(APIError)
        async def api_error(request: Request, e: APIError):
            return JSONResponse(e.body(), status_code=e.status)

        @app.exception_handler(RequestValidationError)
        async def invalid(request: Request, e: RequestValidationError):
            message, param = validation_message(e.errors())
            return JSONResponse(APIError(400, message, param).body(), status_code=400)

        @app.middleware("http")
        async def count(request: Request, call_next):
            response = await call_next(request)
            self.metrics.requests.labels(request.url.path if request.url.path in _PATHS else "other",
                                         str(response.status_code)).inc()
            return response

        @app.get("/health")
        async def health():
            alive = self.engine.running
            body = {"status": "ok" if alive else "engine stopped", "slots": self.engine.config.slots,
                    "active": self.engine.active, "queued": self.engine.queue_depth}
            return JSONResponse(body, status_code=200 if alive else 503)

        @app.get("/metrics")
        async def metrics():
            return Response(self.metrics.text(), media_type="text/plain; version=0.0.4")

        @app.get("/v1/models")
        async def models():
            return {"object": "list", "data": [self._model_card()]}

        @app.get("/v1/models/{model_id}")
        async def model(model_id: str):
            self._check_model(model_id, param=None)
            return self._model_card()

        @app.post("/v1/chat/completions")
        async def chat(body: ChatCompletionRequest, request: Request):
            return await self._chat(body, request)

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest, request: Request):
            return await self._completion(body, request)

        return app

    def _model_card(self) -> dict:
        return {"id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "dgemma-jax"}

    def _check_model(self, name: str, param: str | None = "model") -> None:
        if name != self.config.model_name:
            raise APIError(404, f"model '{name}' does not exist; this server serves '{self.config.model_name}'",
                           param, code="model_not_found")

    # ---- requests ----------------------------------------------------------------------------
    async def _chat(self, body: ChatCompletionRequest, request: Request):
        arrived = time.perf_counter()
        self._check_model(body.model)
        if self.template is None:
            raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
        thinking = bool(body.chat_template_kwargs and body.chat_template_kwargs.enable_thinking)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        try:
            text = self.template.render(messages, add_generation_prompt=True, enable_thinking=thinking)
        except ValueError as e:
            raise APIError(400, f"messages: {e}", "messages") from e
        prompt = self.tokenizer.encode(text)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        default = self.config.default_max_tokens or self.engine.model.generation_config.get("max_new_tokens") or 256
        n_tokens = self._max_tokens(max_tokens, min(default, self.engine.config.max_new_tokens), param)
        return await self._run(body, request, prompt, arrived, n_tokens, chat=True)

    async def _completion(self, body: CompletionRequest, request: Request):
        arrived = time.perf_counter()
        self._check_model(body.model)
        if isinstance(body.prompt, str):
            prompt = self.tokenizer.encode(body.prompt, add_bos=True)
        else:
            prompt = list(body.prompt)
        n_tokens = self._max_tokens(body.max_tokens, self.config.completion_max_tokens, "max_tokens")
        if body.suffix is None:
            return await self._run(body, request, prompt, arrived, n_tokens, chat=False)
        # infilling: the middle, then the suffix clamped after it; EOS does not end the block
        suffix = self.tokenizer.encode(body.suffix)
        if n_tokens + len(suffix) > self.engine.config.max_new_tokens:
            raise APIError(400, f"max_tokens + the suffix's {len(suffix)} tokens is over this server's limit of "
                                f"{self.engine.config.max_new_tokens}", "suffix")
        return await self._run(body, request, prompt, arrived, n_tokens + len(suffix), chat=False,
                               clamp=[FREE] * n_tokens + suffix, eos=(), middle=n_tokens)

    def _max_tokens(self, value: int | None, default: int, param: str) -> int:
        limit = self.engine.config.max_new_tokens
        if value is None:
            return default
        if value < 1 or value > limit:
            raise APIError(400, f"{param} must be from 1 to this server's limit of {limit}, got {value}", param)
        return value

    def _sampler(self, body: _Sampling) -> SamplerConfig:
        values = {k: getattr(body, k) for k in KNOBS if getattr(body, k) is not None}
        try:
            return dataclasses.replace(self.engine.default_sampler, **values).validate()
        except ValueError as e:
            raise APIError(400, str(e), str(e).split(" ", 1)[0]) from e

    def _stops(self, body: _Sampling) -> list[str]:
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise APIError(400, "stop: up to 4 non-empty strings", "stop")
        return stops

    async def _run(self, body: _Sampling, request: Request, prompt: list[int], arrived: float, n_tokens: int,
                   chat: bool, clamp=None, eos=None, middle: int | None = None):
        """Checks the request, submits its ``n`` choices and answers (whole or streamed).
        ``middle``: infilling, the number of generated tokens before the clamped suffix."""
        limit = self.engine.config.max_prompt_tokens
        if len(prompt) > limit:
            raise APIError(400, f"the prompt has {len(prompt)} tokens; this server's limit is {limit}",
                           "messages" if chat else "prompt")
        if not prompt:
            raise APIError(400, "the prompt is empty", "prompt")
        if body.preview and not body.stream:
            raise APIError(400, "preview needs stream: true", "preview")
        sampler, stops = self._sampler(body), self._stops(body)
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        # the engine stops a choice when its text, rendered as the response will be, holds a stop string
        stop_fn = (lambda tokens: self._render(tokens, chat, stops, middle)[2]) if stops else None
        choices = _Choices(asyncio.get_running_loop())
        try:
            for i in range(body.n):
                req = eng.Request(prompt, n_tokens, seed=(seed + i) % 2**32, sampler=sampler, clamp=clamp,
                                  eos_token_ids=eos, stop=stop_fn, preview=body.preview)
                choices.handles.append(self.engine.submit(req, choices.listener(i)))
        except eng.QueueFull as e:
            choices.cancel()
            raise APIError(429, f"server busy: {e}; retry later", None, kind="rate_limit_exceeded") from e
        except ValueError as e:
            choices.cancel()
            raise APIError(400, str(e), str(e).split(":", 1)[0]) from e
        reply = _Reply(self, body, choices, prompt, arrived, chat, stops, middle)
        if body.stream:
            return StreamingResponse(reply.stream(request), media_type="text/event-stream")
        return await reply.whole(request)

    # ---- text --------------------------------------------------------------------------------
    def _decode(self, tokens: list[int], keep_specials: bool) -> str:
        """Chat output keeps its special tokens (the thought channel and end of turn are found in
        them); completions drop them."""
        tokens = [t for t in tokens if t != self.tokenizer.pad_id]
        return self.tokenizer.decode(tokens, skip_special_tokens=not keep_specials)

    @staticmethod
    def _find_stop(text: str, stops: list[str]) -> int | None:
        hits = [text.find(s) for s in stops if s in text]
        return min(hits) if hits else None

    def _render(self, tokens: list[int], chat: bool, stops: list[str], middle: int | None) -> tuple[str, str, bool]:
        """(content, reasoning, stopped) of the tokens so far. ``middle``: infilling, the number of
        leading tokens that are the answer (the rest is the clamped suffix)."""
        if middle is not None:
            tokens = tokens[:middle]
            ends = [k for k, t in enumerate(tokens) if t in self.engine.eos_ids]
            tokens = tokens[:ends[0]] if ends else tokens
        raw = self._decode(tokens, keep_specials=chat)
        cut = self._find_stop(raw, stops)
        if cut is not None:
            raw = raw[:cut]
        if chat:
            content, reasoning = split_thoughts(raw)
            return content, reasoning, cut is not None
        return raw, "", cut is not None

    def _timeout_error(self) -> APIError:
        return APIError(408, f"the request took longer than this server's timeout of {self.config.request_timeout:g} s",
                        None, kind="timeout")


class _Reply:
    """Turns the engine events of one request into an OpenAI response: whole, or as SSE chunks."""

    def __init__(self, server: Server, body, choices: _Choices, prompt: list[int], arrived: float, chat: bool,
                 stops: list[str], middle: int | None):
        self.server, self.body, self.choices, self.prompt = server, body, choices, prompt
        self.arrived, self.chat, self.stops, self.middle = arrived, chat, stops, middle
        self.deadline = arrived + server.config.request_timeout
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.first_canvas = True

    def _canvas_seen(self) -> None:
        if self.first_canvas:
            self.server.metrics.ttft.observe(time.perf_counter() - self.arrived)
            self.first_canvas = False

    def _finished(self, fin: eng.Finished) -> None:
        if sum(fin.steps):
            self.server.metrics.tokens_per_forward.observe(len(fin.tokens) / sum(fin.steps))
        if fin.reason in ("error", "cancelled"):
            raise APIError(500, f"generation {fin.reason}: {fin.error or ''}".strip(), None, kind="server_error")

    def _finish_reason(self, fin: eng.Finished, stopped: bool) -> str:
        return "stop" if stopped or fin.reason == "stop" else "length"

    async def whole(self, request: Request) -> dict:
        results: dict[int, eng.Finished] = {}
        try:
            while len(results) < len(self.choices):
                i, event = await self.choices.next(self.deadline, request)
                if isinstance(event, eng.Canvas):
                    self._canvas_seen()
                elif isinstance(event, eng.Finished):
                    self._finished(event)
                    results[i] = event
        except TimeoutError:
            raise self.server._timeout_error() from None
        except ConnectionAbortedError:
            raise APIError(499, "client disconnected", None) from None
        finally:
            self.choices.cancel()  # no-op for finished requests
        out, completion_tokens = [], 0
        for i in range(len(self.choices)):
            fin = results[i]
            content, reasoning, stopped = self.server._render(fin.tokens, self.chat, self.stops, self.middle)
            completion_tokens += len(fin.tokens)
            reason = self._finish_reason(fin, stopped)
            if self.chat:
                message = {"role": "assistant", "content": content}
                if reasoning:
                    message["reasoning_content"] = reasoning
                out.append({"index": i, "message": message, "finish_reason": reason, "logprobs": None})
            else:
                out.append({"index": i, "text": self._echo() + content, "finish_reason": reason, "logprobs": None})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.server.config.model_name, "choices": out,
                "usage": _usage(len(self.prompt) * len(self.choices), completion_tokens)}

    def _echo(self) -> str:
        return self.server.tokenizer.decode(self.prompt, skip_special_tokens=True) if self.body.echo else ""

    def _chunk(self, i: int | None, delta: dict | None = None, finish: str | None = None, **extra) -> str:
        choices = []
        if i is not None:
            if self.chat:
                choices = [{"index": i, "delta": delta or {}, "finish_reason": finish, "logprobs": None}]
            else:
                choices = [{"index": i, "text": (delta or {}).get("content", ""), "finish_reason": finish,
                            "logprobs": None}]
        return _sse({"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                     "created": self.created, "model": self.server.config.model_name, "choices": choices, **extra})

    async def stream(self, request: Request) -> AsyncIterator[str]:
        """SSE chunks: one per committed canvas and choice with the new text (``content``, and
        ``reasoning_content`` for thoughts), optional previews, a last chunk per choice with its
        finish reason, usage when asked, then ``[DONE]``. Text that could be the start of a stop
        string is held back until the next canvas decides."""
        n = len(self.choices)
        hold = max((len(s) for s in self.stops), default=1) - 1
        sent = [("", "")] * n  # (content, reasoning) streamed so far, per choice
        tokens: list[list[int]] = [[] for _ in range(n)]
        done, completion_tokens = set(), 0

        def delta(i: int, content: str, reasoning: str) -> str | None:
            old_content, old_reasoning = sent[i]
            d = {}
            if reasoning.startswith(old_reasoning) and len(reasoning) > len(old_reasoning):
                d["reasoning_content"] = reasoning[len(old_reasoning):]
                old_reasoning = reasoning
            if content.startswith(old_content) and len(content) > len(old_content):
                d["content"] = content[len(old_content):]
                old_content = content
            sent[i] = (old_content, old_reasoning)
            return self._chunk(i, d) if d else None

        try:
            for i in range(n):
                if self.chat:
                    yield self._chunk(i, {"role": "assistant", "content": ""})
                elif self.body.echo:
                    yield self._chunk(i, {"content": self._echo()})
            while len(done) < n:
                i, event = await self.choices.next(self.deadline, request)
                if isinstance(event, eng.Preview):
                    text = self.server._decode(event.tokens, keep_specials=False)
                    yield self._chunk(i, preview={"canvas": event.index, "step": event.step, "text": text})
                elif isinstance(event, eng.Canvas):
                    self._canvas_seen()
                    tokens[i].extend(event.tokens)
                    content, reasoning, _ = self.server._render(tokens[i], self.chat, self.stops, self.middle)
                    out = delta(i, content[:max(0, len(content) - hold)], reasoning)
                    if out:
                        yield out
                else:
                    done.add(i)
                    self._finished(event)
                    completion_tokens += len(event.tokens)
                    content, reasoning, stopped = self.server._render(event.tokens, self.chat, self.stops, self.middle)
                    out = delta(i, content, reasoning)
                    if out:
                        yield out
                    yield self._chunk(i, finish=self._finish_reason(event, stopped))
            if self.body.stream_options is not None and self.body.stream_options.include_usage:
                yield self._chunk(None, usage=_usage(len(self.prompt) * n, completion_tokens))
            yield "data: [DONE]\n\n"
        except TimeoutError:
            yield _sse(self.server._timeout_error().body())
        except ConnectionAbortedError:
            return
        except APIError as e:
            yield _sse(e.body())
        finally:
            self.choices.cancel()  # frees the slots of a client that went away; no-op once finished


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
