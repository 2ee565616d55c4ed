"""Continuous batching for block diffusion: a fixed number of slots over one preallocated KV cache.

The engine owns ``slots`` rows of a KV cache of ``max_prompt_tokens + max_new_tokens`` positions
(rounded up to a prompt bucket and whole canvases). A background thread repeats:

1. admit waiting requests into free slots: one causal prefill each, written into the slot's row of
   the cache (one compile per prompt bucket);
2. denoise and commit one canvas for every slot at once, with the same compiled function
   ``generate`` uses: each row has its own canvas index (its random draws), sampler settings,
   clamped positions and EOS ids; free slots run frozen (one compile in all);
3. apply the end-of-canvas rules per row, hand each request its canvas, and free the slots of the
   requests that are done (EOS, length, a stop condition, cancelled).

So requests join and leave at canvas boundaries, and a request's output depends only on its own
prompt, seed and settings, never on what shares the batch. Events reach a request through its
``on_event`` callback, called from the engine's threads (the server hops them onto its event loop).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from dgemma_jax.api import Model, prompt_bucket
from dgemma_jax.cache import KVCache, cache_capacity
from dgemma_jax.generation import (FREE, CanvasRows, _denoise_and_commit, _eos_and_pad, eos_rows,
                                   registered_step_hook, row_keys_from_seeds)
from dgemma_jax.layouts import WEIGHT_LAYOUTS, place_for_loop, resolve_weight_layouts
from dgemma_jax.sampling import SamplerConfig, SamplerParams
from dgemma_jax.sharding import logical_to_spec

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Capacity of an engine. ``slots``: rows denoised together; ``max_queue``: requests that may
    wait for a slot (more are refused with ``QueueFull``). ``weight_layouts``: ``"xla"`` moves the
    weights once into the layouts XLA picks for the denoising loop (``dgemma_jax.layouts``; what a
    26B loop needs to fit a TPU v5e chip), ``"default"`` leaves them, ``"auto"``: xla on TPU."""

    slots: int = 4
    max_prompt_tokens: int = 2048
    max_new_tokens: int = 1024
    max_queue: int = 64
    weight_layouts: str = "auto"

    def validate(self) -> "EngineConfig":
        for name in ("slots", "max_prompt_tokens", "max_new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineConfig.{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.max_queue, bool) or not isinstance(self.max_queue, int) or self.max_queue < 0:
            raise ValueError(f"EngineConfig.max_queue must be an integer >= 0, got {self.max_queue!r}")
        if self.weight_layouts not in ("auto", *WEIGHT_LAYOUTS):
            raise ValueError(f"EngineConfig.weight_layouts must be one of {('auto', *WEIGHT_LAYOUTS)}, "
                             f"got {self.weight_layouts!r}")
        return self


@dataclasses.dataclass
class Request:
    """One generation: ``max_new_tokens`` tokens after ``prompt_ids``.

    ``sampler``: None = the engine's default (the checkpoint's generation config); its top_k/top_p
    must be the engine's. ``clamp``: [max_new_tokens] ints, a token or -1 (free) per generated
    position (infilling). ``eos_token_ids``: None = the checkpoint's, ``()`` = none.
    ``stop``: called with the tokens generated so far after each canvas; True ends the request
    (e.g. a stop string). ``preview``: also send a ``Preview`` after every denoising step.
    """

    prompt_ids: Sequence[int]
    max_new_tokens: int
    seed: int = 0
    sampler: SamplerConfig | None = None
    clamp: Sequence[int] | None = None
    eos_token_ids: Sequence[int] | None = None
    stop: Callable[[list[int]], bool] | None = None
    preview: bool = False


@dataclasses.dataclass(frozen=True)
class Canvas:
    """A committed canvas: its tokens up to and including the first EOS (or within ``max_new_tokens``)
    and its decoder passes."""

    index: int
    tokens: list[int]
    steps: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class Preview:
    """The argmax canvas of a request after one denoising step (``preview=True`` requests only)."""

    index: int
    step: int
    tokens: list[int]


@dataclasses.dataclass(frozen=True)
class Finished:
    """The last event of a request. ``reason``: ``"stop"`` (EOS or the stop condition), ``"length"``,
    ``"cancelled"`` or ``"error"`` (with ``error``). ``tokens``: everything generated, as in the
    ``Canvas`` events."""

    reason: str
    tokens: list[int]
    steps: list[int]
    queued_seconds: float
    error: str | None = None


Event = Canvas | Preview | Finished


class QueueFull(RuntimeError):
    """The engine's waiting queue is full."""


class Handle:
    """A submitted request: ``cancel()`` ends it at the next canvas boundary (or before it starts)."""

    def __init__(self, request: Request, on_event: Callable[[Event], None]):
        self.request = request
        self.on_event = on_event
        self.submitted = time.perf_counter()
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        self.cancelled.set()


@dataclasses.dataclass
class _Slot:
    handle: Handle
    sampler: SamplerConfig
    seed: int
    n_canvases: int
    clamp: np.ndarray  # [n_canvases * L] int32
    eos_ids: list[int]
    admitted: float
    canvas_index: int = 0
    tokens: list[int] = dataclasses.field(default_factory=list)
    steps: list[int] = dataclasses.field(default_factory=list)


class Engine:
    """Continuous batching over ``model``. ``start()`` runs the engine thread; ``submit`` queues a
    request; ``generate`` is the blocking form. Thread-safe."""

    def __init__(self, model: Model, config: EngineConfig = EngineConfig()):
        self.model = model
        self.config = config.validate()
        mc = model.config
        self.canvas_length = mc.canvas_length
        self.max_canvases = -(-config.max_new_tokens // mc.canvas_length)
        self.prompt_capacity = prompt_bucket(config.max_prompt_tokens)
        self.capacity = cache_capacity(mc, self.prompt_capacity + self.max_canvases * mc.canvas_length)
        self.default_sampler = SamplerConfig.from_generation_config(model.generation_config)
        self.eos_ids, self.pad_id = _eos_and_pad(model.generation_config, mc)
        self._eos_width = max(len(self.eos_ids), 1)
        self._slots: list[_Slot | None] = [None] * config.slots
        self._waiting: deque[Handle] = deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._cache = self._empty_cache()
        self.stats = EngineStats()
        platform = next(iter(jax.tree.leaves(model.state)[0].devices())).platform
        if resolve_weight_layouts(config.weight_layouts, platform) == "xla":
            place_for_loop(model, config.slots, self.capacity, filters=self.default_sampler.filters)

    # ---- public ------------------------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="dgemma-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stops the thread after the current canvas; requests still queued or running are cancelled."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def check(self, request: Request) -> Request:
        """Raises ValueError naming the field of ``request`` that this engine cannot run."""
        n = len(request.prompt_ids)
        if n < 1:
            raise ValueError("prompt: needs at least one token")
        if n > self.config.max_prompt_tokens:
            raise ValueError(f"prompt: {n} tokens is over this server's limit of {self.config.max_prompt_tokens}")
        if not all(0 <= int(t) < self.model.config.vocab_size for t in request.prompt_ids):
            raise ValueError(f"prompt: token ids must be in [0, {self.model.config.vocab_size})")
        m = request.max_new_tokens
        if isinstance(m, bool) or not isinstance(m, int) or m < 1 or m > self.config.max_new_tokens:
            raise ValueError(f"max_tokens: must be an integer from 1 to this server's limit of "
                             f"{self.config.max_new_tokens}, got {m!r}")
        if request.clamp is not None:
            clamp = np.asarray(request.clamp)
            if clamp.shape != (m,) or ((clamp < FREE) | (clamp >= self.model.config.vocab_size)).any():
                raise ValueError(f"clamp: expected {m} token ids or -1")
        if request.eos_token_ids is not None and len(request.eos_token_ids) > self._eos_width:
            raise ValueError(f"eos_token_ids: at most {self._eos_width} ids")
        sampler = request.sampler or self.default_sampler
        if sampler.filters != self.default_sampler.filters:
            raise ValueError(f"top_k/top_p: this engine runs {self.default_sampler.filters}, got {sampler.filters}")
        return request

    def submit(self, request: Request, on_event: Callable[[Event], None]) -> Handle:
        """Queues ``request`` (checked first: ValueError naming the field); ``on_event`` receives its
        ``Canvas``/``Preview`` events and one ``Finished``. Raises ``QueueFull`` when the queue is full."""
        self.check(request)
        handle = Handle(request, on_event)
        with self._lock:
            self._drop_cancelled()
            if len(self._waiting) >= self.config.max_queue + len(self._free_slots()):
                raise QueueFull(f"the queue is full ({self.config.max_queue} requests waiting)")
            self._waiting.append(handle)
            self._lock.notify_all()
        return handle

    def generate(self, request: Request, timeout: float | None = None) -> Finished:
        """Submits ``request`` and waits for its ``Finished`` event."""
        done = threading.Event()
        box: list[Finished] = []

        def on_event(event):
            if isinstance(event, Finished):
                box.append(event)
                done.set()

        handle = self.submit(request, on_event)
        if not done.wait(timeout):
            handle.cancel()
            done.wait()
        return box[0]

    def warmup(self) -> None:
        """Compiles the prefill (shortest prompt bucket) and the canvas step with a one-token request."""
        self.generate(Request([self.model.config.pad_token_id or 0], 1))

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return sum(s is not None for s in self._slots)

    # ---- engine thread -----------------------------------------------------------------------
    def _free_slots(self) -> list[int]:
        return [i for i, s in enumerate(self._slots) if s is None]

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._waiting and not self.active:
                    self._lock.wait()
                if self._stopping:
                    break
                self._drop_cancelled()
                admit = [(i, self._waiting.popleft()) for i in self._free_slots()[:len(self._waiting)]]
            try:
                for i, handle in admit:
                    self._admit(i, handle)
                if self.active:
                    self._step()
            except Exception as e:  # noqa: BLE001 - a bug in one step fails its requests, not the engine
                log.exception("engine step failed")
                for i, slot in enumerate(self._slots):
                    if slot is not None:
                        self._finish(i, "error", f"engine step failed: {e}")
        with self._lock:
            while self._waiting:
                self._finish_unstarted(self._waiting.popleft(), "cancelled")
        for i, slot in enumerate(self._slots):
            if slot is not None:
                self._finish(i, "cancelled")

    def _drop_cancelled(self) -> None:
        """Removes the cancelled requests from the queue (under the lock), telling each."""
        if any(h.cancelled.is_set() for h in self._waiting):
            for h in [h for h in self._waiting if h.cancelled.is_set()]:
                self._waiting.remove(h)
                self._finish_unstarted(h, "cancelled")

    def _admit(self, i: int, handle: Handle) -> None:
        r = handle.request
        try:
            prompt = np.full((1, prompt_bucket(len(r.prompt_ids))), self.pad_id or 0, np.int32)
            prompt[0, :len(r.prompt_ids)] = r.prompt_ids
            self._cache = _prefill_slot(self.model.graphdef, self.model.state, self._cache, jnp.int32(i), prompt,
                                        np.asarray([len(r.prompt_ids)], np.int32))
        except Exception as e:  # noqa: BLE001 - a request must never take the engine down
            log.exception("prefill failed")
            self._finish_unstarted(handle, "error", f"prefill failed: {e}")
            self._cache = self._empty_cache()
            return
        n = -(-r.max_new_tokens // self.canvas_length)
        clamp = np.full(n * self.canvas_length, FREE, np.int32)
        if r.clamp is not None:
            clamp[:r.max_new_tokens] = r.clamp
        eos = list(self.eos_ids if r.eos_token_ids is None else r.eos_token_ids)
        self._slots[i] = _Slot(handle, r.sampler or self.default_sampler, int(r.seed) % 2**32, n, clamp, eos,
                               admitted=time.perf_counter())
        self.stats.queued(time.perf_counter() - handle.submitted)

    def _step(self) -> None:
        slots, length = self._slots, self.canvas_length
        for i, slot in enumerate(slots):
            if slot is not None and slot.handle.cancelled.is_set():
                self._finish(i, "cancelled")
        live = [i for i, s in enumerate(slots) if s is not None]
        if not live:
            return
        filler = slots[live[0]]
        rows = CanvasRows(
            keys=row_keys_from_seeds([s.seed if s else 0 for s in slots]),
            canvas_index=np.asarray([s.canvas_index if s else 0 for s in slots], np.int32),
            finished=np.asarray([s is None for s in slots]),
            clamp=np.stack([s.clamp[s.canvas_index * length:(s.canvas_index + 1) * length] if s
                            else np.full(length, FREE, np.int32) for s in slots]),
            commit=np.asarray([s is not None and s.canvas_index < s.n_canvases - 1 for s in slots]),
            eos_ids=np.concatenate([eos_rows(s.eos_ids if s else [], 1, self._eos_width) for s in slots]),
            sampler=SamplerParams.stack([(s or filler).sampler for s in slots]),
        )
        previews = {i for i in live if slots[i].handle.request.preview}
        t0 = time.perf_counter()
        try:
            with registered_step_hook(functools.partial(self._preview, previews, set())) as hook_id:
                argmax, passes, self._cache = _denoise_and_commit(
                    self.model.graphdef, self.model.state, self._cache, rows, jnp.int32(hook_id),
                    filters=self.default_sampler.filters, with_hook=bool(previews))
                argmax, passes = np.asarray(argmax), np.asarray(passes)
        except Exception as e:  # noqa: BLE001
            log.exception("canvas step failed")
            for i in live:
                self._finish(i, "error", f"canvas step failed: {e}")
            self._cache = self._empty_cache()
            return
        seconds = time.perf_counter() - t0
        self.stats.canvas(seconds, [int(passes[i]) for i in live])
        for i in live:
            slot = slots[i]
            last = slot.canvas_index == slot.n_canvases - 1
            row = argmax[i].tolist()
            ends = [k for k, t in enumerate(row) if t in slot.eos_ids]
            kept = row[:ends[0] + 1] if ends else row  # generate's rule: what follows the first EOS is pad
            if last:  # the last canvas may hold more positions than max_new_tokens asks for
                kept = kept[:max(0, slot.handle.request.max_new_tokens - len(slot.tokens))]
            stopped = bool(ends) and len(kept) == ends[0] + 1  # its EOS is within max_new_tokens
            slot.tokens.extend(kept)
            slot.steps.append(int(passes[i]))
            self.stats.tokens(len(kept))
            _deliver(slot.handle, Canvas(slot.canvas_index, kept, int(passes[i]), seconds))
            slot.canvas_index += 1
            if stopped or self._stopped_by_request(slot):
                self._finish(i, "stop")
            elif last:
                self._finish(i, "length")

    @staticmethod
    def _stopped_by_request(slot: _Slot) -> bool:
        stop = slot.handle.request.stop
        try:
            return stop is not None and bool(stop(slot.tokens))
        except Exception:  # noqa: BLE001 - a consumer's callback must not stop the engine
            log.exception("stop callback failed")
            return True

    def _preview(self, previews: set[int], sent_last: set[int], canvas_index, step, argmax, canvas, done) -> None:
        """Step hook: a ``Preview`` for every previewing row that ran this step (``sent_last``: rows
        whose final step was already sent)."""
        for i in previews - sent_last:
            slot = self._slots[i]
            if slot is not None:
                _deliver(slot.handle, Preview(int(canvas_index[i]), step, argmax[i].tolist()))
            if done[i]:
                sent_last.add(i)

    def _finish(self, i: int, reason: str, error: str | None = None) -> None:
        slot = self._slots[i]
        self._slots[i] = None
        handle = slot.handle
        self.stats.finished(reason)
        _deliver(handle, Finished(reason, slot.tokens, slot.steps, slot.admitted - handle.submitted, error))

    def _finish_unstarted(self, handle: Handle, reason: str, error: str | None = None) -> None:
        self.stats.finished(reason)
        _deliver(handle, Finished(reason, [], [], time.perf_counter() - handle.submitted, error))

    def _empty_cache(self) -> KVCache:
        mc, mesh = self.model.config, self.model.mesh
        cache = _create_cache(mc, self.config.slots, self.capacity, self.model.dtype)
        if mesh is not None:  # slots over the mesh's batch axes, as the model's rules lay out activations
            cache = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(
                mesh, logical_to_spec(("batch",) + (None,) * (x.ndim - 1), x.shape, mesh))), cache)
        return cache


def _deliver(handle: Handle, event: Event) -> None:
    try:
        handle.on_event(event)
    except Exception:  # noqa: BLE001 - a consumer's callback must not stop the engine
        log.exception("on_event callback failed")


class EngineStats:
    """What the engine reports: finished requests by reason, and every measurement passed on to the
    ``listeners`` as (name, value) (the server's Prometheus metrics)."""

    def __init__(self):
        self.finished_by_reason: dict[str, int] = {}
        self.listeners: list[Callable[[str, float], None]] = []

    def _emit(self, name: str, value: float) -> None:
        for fn in self.listeners:
            fn(name, value)

    def queued(self, seconds: float) -> None:
        self._emit("queue_seconds", seconds)

    def canvas(self, seconds: float, steps: list[int]) -> None:
        self._emit("canvas_seconds", seconds)
        for s in steps:
            self._emit("steps_per_canvas", s)

    def tokens(self, n: int) -> None:
        self._emit("tokens", n)

    def finished(self, reason: str) -> None:
        self.finished_by_reason[reason] = self.finished_by_reason.get(reason, 0) + 1
        self._emit("finished:" + reason, 1)


# ---- jitted parts ------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _create_cache(config, slots: int, capacity: int, dtype) -> KVCache:
    return KVCache.create(config, slots, capacity, dtype)


@functools.partial(jax.jit, static_argnums=0, donate_argnums=2)
def _prefill_slot(graphdef, state, cache: KVCache, slot, prompt, num_valid) -> KVCache:
    """Encodes ``prompt`` [1, T] (``num_valid`` [1] real tokens) into row ``slot`` of ``cache``."""
    model = nnx.merge(graphdef, state)

    def row(x):
        return jax.lax.dynamic_slice_in_dim(x, slot, 1, axis=0)

    def put(x, new):
        return jax.lax.dynamic_update_slice_in_dim(x, new, slot, axis=0)

    one = KVCache(tuple(map(row, cache.keys)), tuple(map(row, cache.values)), jnp.zeros((1,), jnp.int32))
    one = model.encode(prompt, one, num_valid)[1]
    return KVCache(tuple(map(put, cache.keys, one.keys)), tuple(map(put, cache.values, one.values)),
                   put(cache.length, one.length))
