"""The continuous-batching engine and the OpenAI-compatible server, driven by the official ``openai``
client over loopback, on a random tiny checkpoint with a SentencePiece tokenizer and our Gemma 4
chat template.

Equality of outputs is exact (token for token): the engine runs one compiled program whatever shares
the batch, and the forward pass of a row does not depend on the other rows. Against ``generate``
(a different program: its cache has another size) the tests use few denoising steps: the two agree
to float32 rounding, and on a random model's near-uniform distributions enough steps let a rounding
difference flip a sample.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dgemma_jax
from dgemma_jax.chat import ChatTemplate
from dgemma_jax.sampling import SamplerConfig
from dgemma_jax.serving.engine import Engine, EngineConfig, Finished, QueueFull, Request
from dgemma_jax.serving.server import Server, ServerConfig
from dgemma_jax.tokenizer import Tokenizer
from tests import oracle
from tests.tokenizer_files import write_sentencepiece

L = 8  # canvas length
FEW = dict(max_denoising_steps=3)  # generate() and the engine agree exactly over a few steps
LIMITS = dict(slots=4, max_prompt_tokens=64, max_new_tokens=32, max_queue=8)


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory) -> Path:
    path = oracle.save(oracle.build(seed=3, canvas_length=L, vocab_size=512), tmp_path_factory.mktemp("hf"))
    write_sentencepiece(path, 512)
    (path / "chat_template.jinja").write_text(ChatTemplate.default().source)
    return path


@pytest.fixture(scope="module")
def model(snapshot):
    return dgemma_jax.from_pretrained(snapshot, dtype="float32")


@pytest.fixture(scope="module")
def engine(model):
    engine = Engine(model, EngineConfig(**LIMITS)).start()
    yield engine
    engine.stop()


class Running:
    """A uvicorn server on a free loopback port, in a thread."""

    def __init__(self, server: Server):
        self.server = server
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % sock.getsockname()[1]
        self.uvicorn = uvicorn.Server(uvicorn.Config(server.app, log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs=dict(sockets=[sock]), daemon=True)
        self.thread.start()
        while not self.uvicorn.started:
            time.sleep(0.02)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def post(self, path: str, body, **kwargs) -> httpx.Response:
        data = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return httpx.post(self.url + path, content=data, headers={"content-type": "application/json"}, timeout=120,
                          **kwargs)

    def close(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join()


@pytest.fixture(scope="module")
def served(engine, snapshot):
    running = Running(Server(engine, Tokenizer.load(snapshot), ChatTemplate.load(snapshot),
                             ServerConfig(model_name="tiny", request_timeout=120)))
    yield running
    running.close()


def chat(served, text="Hello there", **kwargs):
    kwargs.setdefault("max_tokens", 12)
    kwargs.setdefault("seed", 1)
    return served.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": text}],
                                                 **kwargs)


# ---- engine ------------------------------------------------------------------------------------
def test_engine_equals_generate_over_several_canvases(engine, model):
    prompt = [2, 10, 11, 12]
    want = dgemma_jax.generate(model, [prompt], max_new_tokens=20, seed=7, **FEW).sequences[0, len(prompt):]
    got = engine.generate(Request(prompt, 20, seed=7, sampler=SamplerConfig(**FEW)))
    assert got.reason == "length" and len(got.steps) == 3 and got.tokens == want.tolist()


def test_an_eos_in_the_last_canvas_within_max_tokens_is_a_stop(engine):
    eos = 7
    clamp = [20 + k for k in range(12)]  # two canvases of 8; the last holds 4 of the 12 positions
    clamp[9] = eos
    got = engine.generate(Request([2, 10], 12, clamp=clamp, eos_token_ids=(eos,)))
    assert got.reason == "stop" and got.tokens == clamp[:10]
    got = engine.generate(Request([2, 10], 12, clamp=clamp, eos_token_ids=()))
    assert got.reason == "length" and got.tokens == clamp


def test_engine_batch_gives_each_request_its_own_output(engine):
    """Full 48-step denoising, different prompts, lengths, seeds and sampler settings: run together
    (and joining at different canvases) each request gets exactly what it gets alone."""
    requests = [Request([2, 10, 11, 12], 20, seed=1), Request([2, 30, 31], 12, seed=5),
                Request([2, 7, 8, 9, 10, 11], 24, seed=9, sampler=SamplerConfig(entropy_bound=0.5, t_max=1.0)),
                Request([2, 40], 8, seed=2), Request([2, 41, 42], 16, seed=3)]  # 5 requests, 4 slots
    alone = [engine.generate(r).tokens for r in requests]
    done = [threading.Event() for _ in requests]
    together: list = [None] * len(requests)

    def listener(i):
        def on_event(event):
            if isinstance(event, Finished):
                together[i] = event.tokens
                done[i].set()
        return on_event

    for i, r in enumerate(requests):
        engine.submit(r, listener(i))
    assert all(d.wait(120) for d in done)
    assert together == alone


def test_engine_compiles_the_canvas_step_once(engine):
    """New prompts (same bucket), seeds, lengths and sampler settings reuse the compiled programs."""
    from dgemma_jax.generation import _denoise_and_commit
    from dgemma_jax.serving.engine import _prefill_slot

    engine.generate(Request([2, 3], 8, seed=0))
    before = _denoise_and_commit._cache_size(), _prefill_slot._cache_size()
    engine.generate(Request([2, 3, 4, 5, 6], 24, seed=4, sampler=SamplerConfig(entropy_bound=0.7, t_min=0.2,
                                                                                max_denoising_steps=5)))
    assert (_denoise_and_commit._cache_size(), _prefill_slot._cache_size()) == before


def test_engine_refuses_what_it_cannot_run(model):
    engine = Engine(model, EngineConfig(slots=1, max_prompt_tokens=8, max_new_tokens=16, max_queue=0))  # not started
    with pytest.raises(ValueError, match="over this server's limit of 8"):
        engine.submit(Request(list(range(5, 14)), 4), print)
    with pytest.raises(ValueError, match="max_tokens.*limit of 16"):
        engine.submit(Request([2], 17), print)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 512\)"):
        engine.submit(Request([2, 512], 4), print)
    engine.submit(Request([2], 4), print)  # takes the one slot
    with pytest.raises(QueueFull):
        engine.submit(Request([2], 4), print)
    with pytest.raises(ValueError, match="slots"):
        EngineConfig(slots=0).validate()


# ---- the OpenAI API ----------------------------------------------------------------------------
def test_models_health_and_metrics(served):
    assert [m.id for m in served.client.models.list()] == ["tiny"]
    health = httpx.get(served.url + "/health").json()
    assert health["status"] == "ok" and health["slots"] == 4
    chat(served)
    text = httpx.get(served.url + "/metrics").text
    for name in ("dgemma_requests_total", "dgemma_queue_depth", "dgemma_tokens_per_second", "dgemma_steps_per_canvas",
                 "dgemma_tokens_per_forward", "dgemma_time_to_first_token_seconds", "dgemma_canvas_seconds"):
        assert name in text
    assert 'dgemma_requests_total{endpoint="/v1/chat/completions",status="200"}' in text


def test_chat_matches_the_engine_and_seeds_reproduce(served, engine, snapshot):
    tokenizer, template = Tokenizer.load(snapshot), ChatTemplate.load(snapshot)
    reply = chat(served, "Tell me a story", max_tokens=16, seed=11, extra_body=FEW)
    prompt = tokenizer.encode(template.render([{"role": "user", "content": "Tell me a story"}]))
    want = engine.generate(Request(prompt, 16, seed=11, sampler=SamplerConfig(**FEW)))
    assert reply.usage.prompt_tokens == len(prompt) and reply.usage.completion_tokens == len(want.tokens)
    assert reply.choices[0].message.content == served.server._render(want.tokens, True, [], None)[0]
    assert reply.choices[0].finish_reason == "length"
    again = chat(served, "Tell me a story", max_tokens=16, seed=11, extra_body=FEW)
    other = chat(served, "Tell me a story", max_tokens=16, seed=12, extra_body=FEW)
    assert again.choices[0].message.content == reply.choices[0].message.content
    assert other.choices[0].message.content != reply.choices[0].message.content


def test_n_choices_use_consecutive_seeds(served):
    both = chat(served, n=2, seed=20)
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[1].message.content == chat(served, seed=21).choices[0].message.content
    assert both.usage.prompt_tokens == 2 * chat(served, seed=21).usage.prompt_tokens


def test_streaming_sends_the_same_text_canvas_by_canvas(served):
    whole_reply = chat(served, max_tokens=24, seed=4)
    whole = whole_reply.choices[0].message.content
    chunks = list(chat(served, max_tokens=24, seed=4, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole_reply.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole_reply.usage.completion_tokens and not chunks[-1].choices


def test_preview_events_show_the_canvas_while_it_denoises(served):
    chunks = list(chat(served, max_tokens=8, seed=4, stream=True, extra_body=dict(preview=True, **FEW)))
    previews = [c.model_extra["preview"] for c in chunks if (c.model_extra or {}).get("preview")]
    assert [(p["canvas"], p["step"]) for p in previews] == [(0, 0), (0, 1), (0, 2)]
    assert all(c.choices[0].delta.content is None for c in chunks if (c.model_extra or {}).get("preview"))
    final = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert final == chat(served, max_tokens=8, seed=4, extra_body=FEW).choices[0].message.content


def test_completions_and_stop_strings(served, snapshot):
    plain = served.client.completions.create(model="tiny", prompt="The sky is", max_tokens=16, seed=2)
    text = plain.choices[0].text
    assert plain.object == "text_completion" and plain.usage.completion_tokens == 16
    stop = text[3:5]
    assert stop and text.find(stop) == 3
    cut = served.client.completions.create(model="tiny", prompt="The sky is", max_tokens=16, seed=2, stop=[stop])
    assert cut.choices[0].text == text[:3] and cut.choices[0].finish_reason == "stop"
    echo = served.client.completions.create(model="tiny", prompt="The sky is", max_tokens=16, seed=2, echo=True)
    assert echo.choices[0].text == "The sky is" + text


def test_infill_with_suffix_equals_dgemma_infill(served, model, snapshot):
    tokenizer = Tokenizer.load(snapshot)
    prefix, suffix = "def add(a, b):", " return a + b"
    reply = served.client.completions.create(model="tiny", prompt=prefix, suffix=suffix, max_tokens=5, seed=3,
                                             extra_body=FEW)
    middle = dgemma_jax.infill(model, tokenizer.encode(prefix, add_bos=True), tokenizer.encode(suffix), 5, seed=3,
                               **FEW)
    assert reply.choices[0].text == tokenizer.decode(middle, skip_special_tokens=True)


def test_thinking_reaches_the_prompt_and_thoughts_come_back_apart(served, snapshot):
    off = chat(served, max_tokens=8)
    on = chat(served, max_tokens=8, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert on.usage.prompt_tokens > off.usage.prompt_tokens  # <|think|> in the system turn
    tokenizer = Tokenizer.load(snapshot)
    ids = tokenizer.encode("<|channel>thought\nadd them<channel|>It is 4.<turn|>")
    content, reasoning, stopped = served.server._render(ids, True, [], None)
    assert (content, reasoning, stopped) == ("It is 4.", "add them", False)


def test_concurrent_clients_get_what_they_get_alone(served):
    prompts = [f"Question number {i}" for i in range(6)]
    alone = [chat(served, p, seed=i).choices[0].message.content for i, p in enumerate(prompts)]
    together: list = [None] * len(prompts)

    def ask(i):
        together[i] = chat(served, prompts[i], seed=i).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


# ---- bad input -----------------------------------------------------------------------------------
GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize("body,status,param,match", [
    ("{not json", 400, None, "malformed JSON"),
    (dict(GOOD, max_tokens="ten"), 400, "max_tokens", "max_tokens"),
    (dict(GOOD, max_tokens=-1), 400, "max_tokens", "limit of 32"),
    (dict(GOOD, max_tokens=10**9), 400, "max_tokens", "limit of 32"),
    (dict(GOOD, messages=[{"role": "user", "content": "word " * 100}]), 400, "messages", "limit is 64"),
    (dict(GOOD, model="gpt-4"), 404, "model", "does not exist"),
    (dict(GOOD, temperature=0.5), 400, "temperature", "unknown field 'temperature'"),
    (dict(GOOD, messages=[]), 400, "messages", "messages"),
    (dict(GOOD, messages=[{"role": "robot", "content": "hi"}]), 400, "messages.0.role", "role"),
    ({"messages": GOOD["messages"]}, 400, "model", "missing field 'model'"),
    (dict(GOOD, n=0), 400, "n", "n"),
    (dict(GOOD, t_max=-1.0), 400, "t_max", "t_max"),
    (dict(GOOD, t_min=0.9, t_max=0.5), 400, "t_max", "t_max"),
    (dict(GOOD, preview=True), 400, "preview", "stream"),
    (dict(GOOD, stop=["a", "b", "c", "d", "e"]), 400, "stop", "stop"),
    ([1, 2], 400, None, "body"),
])
def test_bad_requests_get_a_4xx_naming_the_field(served, body, status, param, match):
    r = served.post("/v1/chat/completions", body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and match in error["message"]
    assert chat(served, max_tokens=4).choices[0].message.content is not None  # still serving


def test_bad_completion_requests(served):
    r = served.post("/v1/completions", {"model": "tiny", "prompt": [5, 600], "max_tokens": 4})
    assert r.status_code == 400 and "token ids" in r.json()["error"]["message"]
    r = served.post("/v1/completions", {"model": "tiny", "prompt": "x", "suffix": "y " * 40, "max_tokens": 30})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"


def test_openai_client_raises_for_errors(served):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        served.client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="limit of 32"):
        chat(served, max_tokens=33)


def test_disconnect_mid_stream_frees_the_slot(served, engine):
    before = engine.stats.finished_by_reason.get("cancelled", 0)
    with httpx.stream("POST", served.url + "/v1/chat/completions", timeout=60,
                      json=dict(GOOD, max_tokens=32, stream=True)) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the role chunk, then hang up
    deadline = time.time() + 60
    while engine.stats.finished_by_reason.get("cancelled", 0) == before and time.time() < deadline:
        time.sleep(0.05)
    assert engine.stats.finished_by_reason.get("cancelled", 0) == before + 1
    assert chat(served, max_tokens=4).choices[0].finish_reason == "length"  # still serving


def test_full_queue_is_429_and_a_slow_request_is_408(model, snapshot):
    engine = Engine(model, EngineConfig(slots=1, max_prompt_tokens=64, max_new_tokens=32, max_queue=0))  # not started
    running = Running(Server(engine, Tokenizer.load(snapshot), ChatTemplate.load(snapshot),
                             ServerConfig(model_name="tiny", request_timeout=3)))
    try:
        first: list = []
        t = threading.Thread(target=lambda: first.append(running.post("/v1/chat/completions", GOOD)))
        t.start()
        deadline = time.time() + 30
        while not engine.queue_depth and time.time() < deadline:
            time.sleep(0.02)
        assert engine.queue_depth == 1
        second = running.post("/v1/chat/completions", GOOD)
        assert second.status_code == 429 and "queue is full" in second.json()["error"]["message"]
        t.join()
        assert first[0].status_code == 408 and "timeout of 3 s" in first[0].json()["error"]["message"]
    finally:
        running.close()


FIELDS = ["model", "messages", "max_tokens", "stop", "seed", "n", "stream", "entropy_bound", "max_denoising_steps",
          "t_min", "t_max", "confidence_threshold", "chat_template_kwargs", "preview", "prompt", "suffix", "bogus"]
VALUES = st.recursive(st.none() | st.booleans() | st.integers(-5, 40) | st.floats(-2, 50, allow_nan=False)
                      | st.text(max_size=8),
                      lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["role", "content",
                                                                                                  "enable_thinking"]),
                                                                                  inner, max_size=2), max_leaves=6)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.dictionaries(st.sampled_from(FIELDS), VALUES, max_size=6),
       path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_fuzzed_bodies_never_get_a_5xx(served, body, path):
    body.setdefault("model", "tiny")
    if isinstance(body.get("max_denoising_steps"), int):
        body["max_denoising_steps"] = min(body["max_denoising_steps"], 3)  # keep valid requests quick
    r = served.post(path, body)
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert r.json()["error"]["message"]


def test_engine_on_a_mesh_equals_one_device(snapshot, model):
    from dgemma_jax.sharding import make_mesh

    sharded = dgemma_jax.from_pretrained(snapshot, dtype="float32", mesh=make_mesh({"data": 2, "expert": 4}))
    one, eight = Engine(model, EngineConfig(**LIMITS)), Engine(sharded, EngineConfig(**LIMITS))
    requests = [Request([2, 10, 11, 12], 16, seed=1, sampler=SamplerConfig(**FEW)),
                Request([2, 5], 8, seed=2, sampler=SamplerConfig(**FEW))]
    for e in (one, eight):
        e.start()
    try:
        want = [one.generate(r).tokens for r in requests]
        got = [eight.generate(r).tokens for r in requests]
    finally:
        one.stop()
        eight.stop()
    assert got == want


def test_dgemma_serve_builds_the_server_from_its_flags(snapshot):
    from dgemma_jax import cli
    from dgemma_jax.cli_serve import build_server

    args = cli.build_parser().parse_args(["serve", "--model", str(snapshot), "--slots", "2", "--max-tokens", "16",
                                          "--max-prompt-tokens", "32", "--mesh", "expert=2", "--no-warmup"])
    server, engine = build_server(args)
    try:
        assert server.config.model_name == snapshot.name and engine.config.slots == 2 and engine.running
        assert engine.capacity == 32 + 2 * L and engine.model.mesh.shape == {"expert": 2}
    finally:
        engine.stop()
    assert cli.main(["serve", "--model", str(snapshot), "--mesh", "expert"]) == 1  # named error, no traceback
