"""Block-autoregressive generation: prefill, then per canvas a jitted denoising loop and a commit.

``generate`` runs, for a batch of prompts:

1. prefill: one causal ``encode`` pass writes the prompt's K/V into a cache preallocated for the
   prompt plus every canvas the call may need (one compile per batch, prompt bucket and canvas
   count);
2. per canvas, one jitted call: a random canvas, then a ``jax.lax.while_loop`` of denoising steps
   with per-row done flags (the loop ends when every row has stopped or after
   ``max_denoising_steps``), then the argmax canvas is committed to the cache with ``encode``;
3. on the host, transformers' end-of-canvas rules: a row with an EOS in its canvas is finished,
   tokens after its first EOS become pad, canvases of finished rows are all pad.

Randomness is per row: row ``b`` draws from ``seeds[b]`` only, so a prompt gets the same output in
any batch (given the same seed). Rows of different lengths are packed to the left of the cache with
their own lengths, so positions and masks are those of the row alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dgemma_jax import sampling
from dgemma_jax.api import Model, _as_tokens, prompt_bucket
from dgemma_jax.cache import KVCache, cache_capacity
from dgemma_jax.model import LOGITS_AXES
from dgemma_jax.sampling import SamplerConfig, SamplerParams
from dgemma_jax.sharding import constrain

FREE = -1  # in ``clamp_ids``: a position the sampler writes


class CanvasRows(NamedTuple):
    """Per-row inputs of one canvas (a pytree; every leaf has the batch as its first axis)."""

    keys: jax.Array  # [B] the row's PRNG key (from its seed)
    canvas_index: jax.Array  # [B] int32: which canvas of the row this is (selects its random draws)
    finished: jax.Array  # [B] bool: rows that do not run (done before, or empty slots); frozen, not counted
    clamp: jax.Array  # [B, L] int32: the token a position is clamped to, or -1
    commit: jax.Array  # [B] bool: commit the canvas to the cache afterwards (skipped where it holds an EOS)
    eos_ids: jax.Array  # [B, E] int32: the ids that end the row, -1 = unused entry
    sampler: SamplerParams  # [B] each row's sampler settings


def eos_rows(eos_ids: Sequence[int], batch: int, width: int | None = None) -> np.ndarray:
    """``eos_ids`` for every row as ``CanvasRows.eos_ids`` [batch, width], padded with -1."""
    width = max(len(eos_ids), 1) if width is None else width
    if len(eos_ids) > width:
        raise ValueError(f"eos_token_ids: at most {width} ids, got {len(eos_ids)}")
    row = np.full(width, -1, np.int32)
    row[:len(eos_ids)] = eos_ids
    return np.tile(row, (batch, 1))


@dataclasses.dataclass(frozen=True)
class DenoisingStep:
    """What a per-step hook sees after each denoising step of a canvas (host numpy arrays)."""

    canvas_index: int
    step: int  # 0-based step within the canvas
    argmax_canvas: np.ndarray  # [B, L] the current best guess (what the canvas would commit)
    canvas: np.ndarray  # [B, L] the re-noised canvas the next step reads
    done: np.ndarray  # [B] rows that have stopped denoising (finished rows included)


@dataclasses.dataclass
class GenerationResult:
    """Output of :func:`generate`.

    ``sequences`` [B, T + max_new_tokens] int32: the prompt as given, then the generated tokens (pad
    after EOS and for canvases a finished row did not run). ``tokens_per_forward`` [B]: non-pad
    generated tokens / decoder passes the row ran, as transformers computes it.
    ``steps`` [B, C]: decoder passes per row and canvas (0 once the row had finished);
    ``steps_per_canvas`` [B]: their mean over the canvases the row denoised.
    """

    sequences: np.ndarray
    tokens_per_forward: np.ndarray
    steps_per_canvas: np.ndarray
    steps: np.ndarray
    prefill_seconds: float
    canvas_seconds: list[float]
    sampler: SamplerConfig

    @property
    def forward_passes(self) -> np.ndarray:
        """Decoder passes each row ran, [B]."""
        return self.steps.sum(axis=1)


def generate(model: Model, prompt_ids, max_new_tokens: int | None = None, seed: int | Sequence[int] = 0,
             max_denoising_steps: int | None = None, entropy_bound: float | None = None,
             t_min: float | None = None, t_max: float | None = None, confidence_threshold: float | None = None,
             stability_threshold: int | None = None, *, attention_mask=None, clamp_ids=None,
             eos_token_ids: Sequence[int] | None = None,
             on_step: Callable[[DenoisingStep], None] | None = None,
             on_canvas: Callable[[int, np.ndarray], None] | None = None, **sampler_overrides) -> GenerationResult:
    """Generates up to ``max_new_tokens`` tokens after each prompt, one canvas at a time.

    Args:
      model: a loaded :class:`~dgemma_jax.api.Model`.
      prompt_ids: [B, T] ints, or a list of token lists of different lengths (left-padded in the
        output). With ``attention_mask`` [B, T] (1 = token, 0 = padding, either side) rows may be
        padded; each row is run exactly as if alone.
      max_new_tokens: tokens to generate per row (rounded up to whole canvases internally). None =
        the checkpoint's ``generation_config.json`` value, else 256.
      seed: one int for every row, or one per row.
      max_denoising_steps, entropy_bound, t_min, t_max, confidence_threshold, stability_threshold,
        and ``sampler_overrides`` (``top_k``, ``top_p``): sampler settings; None = the checkpoint's
        ``generation_config.json`` value (transformers' defaults where it has none).
        ``confidence_threshold=0`` disables adaptive stopping.
      clamp_ids: [B, max_new_tokens] or [max_new_tokens] ints: generated positions clamped to the
        given token (never re-noised, not counted by acceptance or stopping), ``-1`` = free. This is
        infilling: the free positions are written with the clamped ones visible on both sides.
      eos_token_ids: ids that end a row; None = the checkpoint's (``generation_config.json``, else
        config.json), ``[]`` = none (always generate ``max_new_tokens``).
      on_step: called after every denoising step with a :class:`DenoisingStep` (costs a host round
        trip per step; leave None for speed).
      on_canvas: called after every committed canvas with (canvas index, its tokens [B, L] after the
        EOS/pad rules).

    Returns:
      :class:`GenerationResult`. The first call for a new shape includes compilation time.
    """
    generation_config = model.generation_config
    sampler = SamplerConfig.from_generation_config(
        generation_config, max_denoising_steps=max_denoising_steps, entropy_bound=entropy_bound, t_min=t_min,
        t_max=t_max, confidence_threshold=confidence_threshold, stability_threshold=stability_threshold,
        **sampler_overrides)
    if max_new_tokens is None:
        max_new_tokens = generation_config.get("max_new_tokens") or 256
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    config = model.config
    vocab, length = config.vocab_size, config.canvas_length
    prompt, mask = _prompt_and_mask(prompt_ids, attention_mask, config.pad_token_id)
    model._check_vocab(prompt, "prompt_ids")
    batch, prompt_len = prompt.shape
    packed, num_valid = _pack_left(prompt, mask, config.pad_token_id)
    seeds = _row_seeds(seed, batch)
    n_canvases = -(-max_new_tokens // length)
    clamp = _clamp_array(clamp_ids, batch, max_new_tokens, n_canvases * length, vocab)
    eos_ids, pad_id = _eos_and_pad(generation_config, config)
    if eos_token_ids is not None:
        eos_ids = [int(e) for e in eos_token_ids]

    capacity = cache_capacity(config, packed.shape[1] + n_canvases * length)
    t0 = time.perf_counter()
    cache = _prefill(model.graphdef, model.state, packed, num_valid, capacity)
    jax.block_until_ready(cache)
    prefill_seconds = time.perf_counter() - t0

    row_keys = row_keys_from_seeds(seeds)
    params, eos = sampler.params(batch), eos_rows(eos_ids, batch)
    finished = np.zeros(batch, bool)
    canvases, steps, canvas_seconds = [], [], []

    def step_hook(canvas_index, step, argmax, canvas, done):
        on_step(DenoisingStep(int(canvas_index[0]), step, argmax, canvas, done))

    with registered_step_hook(step_hook) as hook_id:
        for index in range(n_canvases):
            t0 = time.perf_counter()
            last = index == n_canvases - 1
            rows = CanvasRows(row_keys, np.full(batch, index, np.int32), finished,
                              clamp[:, index * length:(index + 1) * length], np.full(batch, not last), eos, params)
            argmax, passes, cache = _denoise_and_commit(model.graphdef, model.state, cache, rows, jnp.int32(hook_id),
                                                        filters=sampler.filters, with_hook=on_step is not None)
            tokens, finished = finalize_canvas(np.asarray(argmax), finished, last, eos_ids, pad_id)
            canvases.append(tokens)
            steps.append(np.asarray(passes))
            canvas_seconds.append(time.perf_counter() - t0)
            if on_canvas is not None:
                on_canvas(index, tokens)
            if finished.all():
                break

    generated = np.concatenate(canvases, axis=1)  # [B, canvases run * L]
    steps = np.stack(steps, axis=1)  # [B, canvases run]
    tokens_per_forward = np.asarray(sampling.tokens_per_forward(
        np.concatenate([prompt, generated], axis=1), steps.sum(1), prompt_len, pad_id))
    denoised = np.maximum((steps > 0).sum(1), 1)
    out = np.full((batch, max_new_tokens), pad_id if pad_id is not None else 0, np.int32)
    kept = min(max_new_tokens, generated.shape[1])
    out[:, :kept] = generated[:, :kept]
    return GenerationResult(
        sequences=np.concatenate([prompt, out], axis=1), tokens_per_forward=tokens_per_forward,
        steps_per_canvas=(steps.sum(1) / denoised).astype(np.float32), steps=steps,
        prefill_seconds=prefill_seconds, canvas_seconds=canvas_seconds, sampler=sampler)


def infill(model: Model, prefix_ids: Sequence[int], suffix_ids: Sequence[int], middle_length: int,
           seed: int = 0, **sampler_settings) -> list[int]:
    """Writes ``middle_length`` tokens between ``prefix_ids`` and ``suffix_ids``, seeing both.

    The prefix is the prompt; the generated block is the middle followed by the suffix, whose
    positions are clamped (never re-noised), so every denoising step of the middle attends to the
    suffix. EOS does not end the block; the middle is cut at its first EOS, if any. Returns the
    middle's token ids. ``sampler_settings``: as for :func:`generate`.
    """
    suffix = [int(t) for t in suffix_ids]
    if isinstance(middle_length, bool) or not isinstance(middle_length, int) or middle_length < 1:
        raise ValueError(f"middle_length must be an integer >= 1, got {middle_length!r}")
    if not len(prefix_ids):
        raise ValueError("prefix_ids: needs at least one token (e.g. BOS)")
    clamp = np.asarray([FREE] * middle_length + suffix, np.int64)
    result = generate(model, [list(prefix_ids)], max_new_tokens=len(clamp), seed=seed, clamp_ids=clamp,
                      eos_token_ids=[], **sampler_settings)
    middle = result.sequences[0, len(prefix_ids):len(prefix_ids) + middle_length].tolist()
    eos, _ = _eos_and_pad(model.generation_config, model.config)
    cut = next((i for i, t in enumerate(middle) if t in eos), len(middle))
    return middle[:cut]


def finalize_canvas(tokens: np.ndarray, finished: np.ndarray, reached_max_length: bool, eos_ids: Sequence[int],
                    pad_id: int | None) -> tuple[np.ndarray, np.ndarray]:
    """transformers' end-of-canvas rules (``_finalize_canvas`` with max-length and EOS criteria).

    ``tokens`` [B, L]: the committed canvas; ``finished`` [B]: rows finished before it. A row is
    finished after this canvas if it was before, the canvas holds an EOS, or the length limit is
    reached. With a pad id: canvases of rows finished before become all pad, and every token after
    a row's first EOS becomes pad. Returns (tokens, finished), new arrays.
    """
    tokens = np.array(tokens, np.int32)
    is_eos = np.isin(tokens, np.asarray(eos_ids, np.int32))
    finished_now = is_eos.any(-1) | reached_max_length
    finished_after = finished | finished_now
    if pad_id is not None and finished_after.any():
        tokens[finished] = pad_id
        if len(eos_ids) and finished_now.any():
            seen = np.cumsum(is_eos, axis=-1)
            tokens[(seen > 0) & ~((seen == 1) & is_eos)] = pad_id
    return tokens, finished_after


# ---- jitted parts ------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 4))
def _prefill(graphdef, state, prompt, num_valid, capacity: int) -> KVCache:
    model = nnx.merge(graphdef, state)
    cache = KVCache.create(model.config, prompt.shape[0], capacity, model.dtype)
    return model.encode(prompt, cache, num_valid)[1]


def denoise_and_commit(graphdef, state, cache: KVCache, rows: CanvasRows, hook_id, *,
                       filters: tuple[int, float] = (0, 1.0), with_hook: bool = False):
    """Denoises one canvas for every row, then commits its argmax canvas to the cache.

    ``rows``: the per-row inputs (``finished`` rows run frozen and are not counted; each row stops
    at its own ``max_steps``). The commit writes the rows with ``rows.commit`` whose canvas holds no
    EOS (the others keep their length) and is skipped when there are none. ``filters``: the
    candidate draw's (top_k, top_p). Returns (argmax canvas [B, L], decoder passes [B], cache).
    """
    model = nnx.merge(graphdef, state)
    batch, length = rows.clamp.shape
    vocab = model.config.vocab_size
    params = rows.sampler
    schedule, acceptance, stop = params.schedule(), params.acceptance(), params.stop()
    clamp = rows.clamp
    clamped = clamp >= 0  # [B, L]

    def pin(tokens):
        return jnp.where(clamped, clamp, tokens)

    init_keys, loop_keys = canvas_keys(rows.keys, rows.canvas_index)
    canvas = pin(sampling.initial_canvas(init_keys, length, vocab))

    def step_fn(carry):
        step, canvas, argmax, sc_logits, stop_state, done, passes = carry
        passes = passes + (~done).astype(jnp.int32)
        raw = model.denoise(canvas, cache, sc_logits, jnp.broadcast_to(step > 0, (batch,)))
        tempered = schedule(raw, step)  # [B, L, V] float32
        draw_keys, noise_keys = _split_rows(_fold_rows(loop_keys, step))
        candidates = sampling.sample_candidates(draw_keys, tempered, *filters)
        entropies = jnp.where(clamped, 0.0, sampling.entropy(tempered))  # [B, L]
        accept = acceptance(entropies)
        new_canvas = pin(sampling.uniform_renoise(noise_keys, candidates, accept, vocab))
        new_argmax = pin(jnp.argmax(tempered, axis=-1).astype(jnp.int32))
        # Rows that stopped keep their canvas, argmax and self-conditioning logits.
        new_canvas = jnp.where(done[:, None], canvas, new_canvas)
        new_argmax = jnp.where(done[:, None], argmax, new_argmax)
        tempered = jnp.where(done[:, None, None], sc_logits.astype(jnp.float32), tempered)
        stop_state, stop_now = stop.update(stop_state, new_argmax, entropies, free=~clamped)
        done = done | stop_now | (step + 1 >= params.max_steps)
        if with_hook:
            jax.debug.callback(_call_step_hook, hook_id, rows.canvas_index, step, new_argmax, new_canvas, done,
                               ordered=True)
        return step + 1, new_canvas, new_argmax, tempered.astype(sc_logits.dtype), stop_state, done, passes

    def keep_going(carry):
        return ~jnp.all(carry[5])

    no_logits = constrain(jnp.zeros((batch, length, vocab), model.dtype), LOGITS_AXES, model.mesh)
    carry = (jnp.int32(0), canvas, canvas, no_logits,
             stop.init(batch, length), rows.finished, jnp.zeros((batch,), jnp.int32))
    _, _, argmax, _, _, _, passes = jax.lax.while_loop(keep_going, step_fn, carry)

    has_eos = jnp.any(argmax[:, :, None] == rows.eos_ids[:, None, :], axis=(1, 2))  # [B]
    commit = rows.commit & ~rows.finished & ~has_eos

    def write(c):
        new = model.encode(argmax, c)[1]
        return dataclasses.replace(new, length=jnp.where(commit, new.length, c.length))

    cache = jax.lax.cond(jnp.any(commit), write, lambda c: c, cache)
    return argmax, passes, cache


_denoise_and_commit = jax.jit(denoise_and_commit, static_argnums=0, static_argnames=("filters", "with_hook"),
                              donate_argnums=2)


def row_keys_from_seeds(seeds) -> jax.Array:
    """One PRNG key per row, [B]."""
    return jax.vmap(jax.random.key)(jnp.asarray(seeds, jnp.uint32))


def canvas_keys(row_keys: jax.Array, canvas_index) -> tuple[jax.Array, jax.Array]:
    """Per-row keys of one canvas: (initial canvas keys [B], denoising-loop keys [B]).
    ``canvas_index``: one for every row, or [B]."""
    return _split_rows(_fold_rows(row_keys, canvas_index))


def _fold_rows(keys, data):
    """fold_in(keys[b], data) per row; ``data`` a scalar or [B]."""
    return jax.vmap(jax.random.fold_in)(keys, jnp.broadcast_to(jnp.asarray(data, jnp.uint32), keys.shape))


def _split_rows(keys):
    pair = jax.vmap(jax.random.split)(keys)  # [B, 2]
    return pair[:, 0], pair[:, 1]


_STEP_HOOKS: dict[int, Callable[..., None]] = {}  # live step hooks by id
_HOOK_IDS = itertools.count()


@contextlib.contextmanager
def registered_step_hook(fn) -> int:
    """Registers ``fn(canvas_index [B], step, argmax [B, L], canvas [B, L], done [B])`` (host numpy
    arrays) as the step hook of ``_denoise_and_commit`` calls made inside the block; yields its id
    (XLA runs host callbacks on its own threads, so the id travels through the jitted loop)."""
    hook_id = next(_HOOK_IDS) % 2**31
    _STEP_HOOKS[hook_id] = fn
    try:
        yield hook_id
    finally:
        del _STEP_HOOKS[hook_id]


def _call_step_hook(hook_id, canvas_index, step, argmax, canvas, done) -> None:
    _STEP_HOOKS[int(hook_id)](np.asarray(canvas_index), int(step), np.asarray(argmax), np.asarray(canvas),
                              np.asarray(done))


# ---- input handling ----------------------------------------------------------------------------


def _prompt_and_mask(prompt_ids, attention_mask, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (prompt [B, T] int32, mask [B, T] bool). A list of token lists is left-padded."""
    if isinstance(prompt_ids, (list, tuple)) and prompt_ids and all(
            isinstance(r, (list, tuple, np.ndarray)) for r in prompt_ids) and attention_mask is None:
        rows = [np.asarray(r) for r in prompt_ids]
        if any(r.ndim != 1 for r in rows):
            raise ValueError("prompt_ids: a list of prompts must hold 1-D token lists")
        width = max(len(r) for r in rows)
        prompt = np.full((len(rows), width), pad_id, np.int64)
        mask = np.zeros((len(rows), width), bool)
        for b, r in enumerate(rows):
            if len(r):
                prompt[b, width - len(r):], mask[b, width - len(r):] = r, True
        prompt_ids, attention_mask = prompt, mask
    prompt = _as_tokens(prompt_ids, "prompt_ids")
    if attention_mask is None:
        mask = np.ones(prompt.shape, bool)
    else:
        mask = np.asarray(attention_mask)
        if mask.shape != prompt.shape:
            raise ValueError(f"attention_mask: expected shape {prompt.shape} (as prompt_ids), found {mask.shape}")
        mask = mask.astype(bool)
    empty = np.flatnonzero(~mask.any(axis=1))
    if prompt.shape[1] == 0 or len(empty):
        raise ValueError(f"prompt_ids: every row needs at least one token (row {int(empty[0]) if len(empty) else 0} "
                         "has none)")
    return prompt, mask


def _pack_left(prompt: np.ndarray, mask: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Moves each row's tokens to the left, right-pads to a length bucket: ([B, bucket], lengths [B])."""
    lengths = mask.sum(axis=1).astype(np.int32)
    packed = np.full((prompt.shape[0], prompt_bucket(int(lengths.max()))), pad_id, np.int32)
    for b in range(prompt.shape[0]):
        packed[b, :lengths[b]] = prompt[b, mask[b]]
    return packed, lengths


def _row_seeds(seed, batch: int) -> np.ndarray:
    seeds = np.atleast_1d(np.asarray(seed))
    if not np.issubdtype(seeds.dtype, np.integer) or seeds.ndim != 1:
        raise ValueError(f"seed must be an int or a list of ints, got {seed!r}")
    if len(seeds) == 1:
        seeds = np.repeat(seeds, batch)
    if len(seeds) != batch:
        raise ValueError(f"seed: got {len(seeds)} seeds for a batch of {batch} prompts")
    return seeds.astype(np.uint32)


def _clamp_array(clamp_ids, batch: int, max_new: int, width: int, vocab: int) -> np.ndarray:
    """-> [B, width] int32: the clamped token per generated position, -1 where free."""
    out = np.full((batch, width), FREE, np.int32)
    if clamp_ids is None:
        return out
    clamp = np.asarray(clamp_ids)
    if clamp.ndim == 1:
        clamp = np.broadcast_to(clamp, (batch, clamp.shape[0]))
    if clamp.shape != (batch, max_new) or not np.issubdtype(clamp.dtype, np.integer):
        raise ValueError(f"clamp_ids: expected integers of shape [{batch}, {max_new}] or [{max_new}] "
                         f"(batch, max_new_tokens), found {clamp.dtype} {clamp.shape}")
    if ((clamp < FREE) | (clamp >= vocab)).any():
        raise ValueError(f"clamp_ids: values must be -1 (free) or token ids in [0, {vocab})")
    out[:, :max_new] = clamp
    return out


def _eos_and_pad(generation_config: dict[str, Any], config) -> tuple[list[int], int | None]:
    eos = generation_config.get("eos_token_id", config.eos_token_ids)
    eos = [] if eos is None else [int(e) for e in np.atleast_1d(eos)]
    pad = generation_config.get("pad_token_id", config.pad_token_id)
    return eos, (None if pad is None else int(pad))
