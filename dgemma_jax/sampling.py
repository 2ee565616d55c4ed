"""Sampler pieces of block diffusion: temperature schedule, candidate sampling, entropy-bound
acceptance, uniform re-noising, adaptive stopping and the tokens-per-forward metric.

Each piece is a pure function of jax arrays (usable inside ``jax.lax.while_loop``); random draws
take one key per row (``keys`` [B]), so a row's draws never depend on the rest of the batch;
per-row state is carried as arrays. The semantics are those of
transformers' ``generation_diffusion_gemma.py``. One denoising step, as transformers wires it::

    tempered = schedule(raw_logits, step)            # also the next step's self-conditioning
    candidates = sample_candidates(keys_a, tempered)
    argmax_canvas = argmax(tempered)                  # what a canvas commits
    entropies = entropy(tempered)
    accept = acceptance(entropies)
    canvas = uniform_renoise(keys_b, candidates, accept, vocab_size)
    stop_state, done = stop.update(stop_state, argmax_canvas, entropies)

Ties in entropy (and in top-p) are broken by position, lowest first (a stable sort).
transformers uses ``torch.sort``, which on CPU is stable only up to 16 elements, so on a longer
canvas its order among exactly equal entropies is unspecified.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def entropy(logits: jax.Array) -> jax.Array:
    """Entropy (nats) of softmax(logits) over the last axis, float32: [..., V] -> [...].

    Masked (-inf) logits contribute zero, as in ``torch.distributions.Categorical.entropy``.
    """
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    finite_logp = jnp.maximum(logp, jnp.finfo(jnp.float32).min)
    return -jnp.sum(jnp.exp(logp) * finite_logp, axis=-1)


def _per_row(x, ndim: int) -> jax.Array:
    """A scalar setting as is, a per-row one [B] as [B, 1, ...] to broadcast against [B, ...] (``ndim`` axes)."""
    x = jnp.asarray(x)
    return x.reshape(x.shape + (1,) * (ndim - 1)) if x.ndim == 1 else x


@dataclasses.dataclass(frozen=True)
class LinearTemperature:
    """Temperature linear in the number of steps *remaining*, counting the current one.

    ``step`` is the 0-based index of the denoising step within a canvas (transformers' ``cur_step``
    counts down: ``cur_step = max_steps - step``). Step 0 runs at ``t_max``; the last allowed step
    at ``t_min + (t_max - t_min) / max_steps``, so the schedule never reaches ``t_min``.

    Each setting is a scalar or one value per row ([B] arrays, e.g. ``SamplerParams``). ``t_span`` is
    ``t_max - t_min`` computed in float64 and rounded once, as transformers computes it in Python.
    """

    t_min: float | jax.Array
    t_span: float | jax.Array
    max_steps: int | jax.Array

    @classmethod
    def between(cls, t_min: float, t_max: float, max_steps: int) -> "LinearTemperature":
        return cls(t_min, t_max - t_min, max_steps)

    def temperature(self, step) -> jax.Array:
        """Float32 temperature of 0-based ``step``: a scalar, or [B] for per-row settings."""
        max_steps = jnp.asarray(self.max_steps, jnp.float32)
        remaining = jnp.asarray(self.max_steps - step, jnp.float32)
        return jnp.asarray(self.t_min, jnp.float32) + jnp.asarray(self.t_span, jnp.float32) * (remaining / max_steps)

    def __call__(self, logits: jax.Array, step) -> jax.Array:
        """Tempered logits [B, L, V], float32 (XLA divides by multiplying with the reciprocal: within
        1 ulp of torch's division)."""
        return logits.astype(jnp.float32) / _per_row(self.temperature(step), logits.ndim)


def filter_top_k_top_p(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Sets logits outside the top-k / nucleus (top-p) to -inf; ``top_k=0``, ``top_p=1`` disable.

    Same rules as transformers' ``TopKLogitsWarper`` (ties with the k-th value are kept) and
    ``TopPLogitsWarper`` (drop the tokens whose ascending cumulative probability is <= 1 - top_p,
    always keep the most likely one), applied in that order. ``top_k`` must be static under jit.
    """
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]  # [..., 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(logits, axis=-1, stable=True)  # ascending
        cum = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1), axis=-1)
        drop_sorted = (cum <= 1.0 - top_p).at[..., -1].set(False)
        drop = jnp.put_along_axis(jnp.zeros_like(drop_sorted), order, drop_sorted, axis=-1, inplace=False)
        logits = jnp.where(drop, -jnp.inf, logits)
    return logits


_BLOCK = 256  # tokens per block of the two-level cumulative sum in ``sample_candidates``


def sample_candidates(keys: jax.Array, logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """One token per position from softmax(logits) (already tempered), one key per row:
    keys [B], logits [B, L, V] -> int32 [B, L].

    Inverse-CDF sampling: one uniform draw per position (the first token whose cumulative
    probability exceeds it), instead of one Gumbel draw per vocabulary entry, which on CPU costs
    more than the rest of the sampler together. The cumulative sum runs in two levels, over blocks
    of ``_BLOCK`` tokens and then inside the one block the draw falls in, so no [B, L, V] cumulative
    sum is made: every [B, L, V] step is elementwise or a reduction, which XLA splits over a mesh
    when the vocabulary is sharded. Tokens of probability 0 are never drawn.
    """
    logits = filter_top_k_top_p(logits.astype(jnp.float32), top_k, top_p)
    batch, length, vocab = logits.shape
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # [B, L, V] unnormalised probabilities
    if vocab % _BLOCK:
        weights = jnp.pad(weights, ((0, 0), (0, 0), (0, -vocab % _BLOCK)))
    blocks = weights.reshape(batch, length, -1, _BLOCK)  # [B, L, K, BLOCK]
    block_mass = jnp.sum(blocks, axis=-1)  # [B, L, K]
    block_cdf = jnp.cumsum(block_mass, axis=-1)
    u = jax.vmap(lambda k: jax.random.uniform(k, (length,)))(keys)  # [B, L]
    u = u * block_cdf[..., -1]  # within the (rounded) total mass
    block = _first_above(block_cdf, u, block_mass > 0)  # [B, L]
    chosen = jnp.sum(jnp.where((jnp.arange(blocks.shape[2]) == block[..., None])[..., None], blocks, 0.0),
                     axis=2)  # [B, L, BLOCK]: the block the draw falls in (a sum of zeros and it: exact)
    before = jnp.where(block > 0, jnp.take_along_axis(block_cdf, jnp.maximum(block - 1, 0)[..., None], -1)[..., 0],
                       0.0)  # [B, L] mass of the blocks before it
    token = _first_above(before[..., None] + jnp.cumsum(chosen, axis=-1), u, chosen > 0)
    return (block * _BLOCK + token).astype(jnp.int32)


def _first_above(cdf: jax.Array, u: jax.Array, positive: jax.Array) -> jax.Array:
    """Index of the first entry of the nondecreasing ``cdf`` [..., N] above ``u`` [...]; where
    rounding leaves none above it, the last entry of positive mass (``positive`` [..., N])."""
    n = cdf.shape[-1]
    first = jnp.sum(cdf <= u[..., None], axis=-1)
    last_positive = n - 1 - jnp.argmax(positive[..., ::-1], axis=-1)
    return jnp.where(first < n, first, last_positive)


@dataclasses.dataclass(frozen=True)
class EntropyBoundAcceptance:
    """Accepts the lowest-entropy positions of each row while (cumulative entropy - the current
    position's entropy) <= ``bound``: the sum of all but the largest accepted entropy is bounded,
    so the first (lowest) position is always accepted."""

    bound: float

    def __call__(self, entropies: jax.Array) -> jax.Array:
        """Entropies of the tempered logits [B, L] -> accept mask [B, L] bool."""
        h = entropies
        order = jnp.argsort(h, axis=-1, stable=True)
        sorted_h = jnp.take_along_axis(h, order, axis=-1)
        accept_sorted = jnp.cumsum(sorted_h, axis=-1) - sorted_h <= _per_row(jnp.asarray(self.bound, jnp.float32), 2)
        return jnp.put_along_axis(jnp.zeros_like(accept_sorted), order, accept_sorted, axis=-1, inplace=False)


def initial_canvas(keys: jax.Array, length: int, vocab_size: int) -> jax.Array:
    """A canvas of uniform random tokens, one row per key: keys [B] -> int32 [B, length]."""
    return jax.vmap(lambda k: jax.random.randint(k, (length,), 0, vocab_size, jnp.int32))(keys)


def uniform_renoise(keys: jax.Array, canvas: jax.Array, accept: jax.Array, vocab_size: int) -> jax.Array:
    """Keeps ``canvas`` [B, L] where ``accept`` [B, L]; every other position gets a uniform random
    token (one key per row, ``keys`` [B])."""
    noise = initial_canvas(keys, canvas.shape[1], vocab_size)
    return jnp.where(accept, canvas, noise.astype(canvas.dtype))


class StopState(NamedTuple):
    """Per-row state of ``StableAndConfidentStop`` (a pytree)."""

    previous: jax.Array  # [B, L] int32: last argmax canvas, -1 before the first step
    unchanged_steps: jax.Array  # [B] int32: consecutive steps the argmax canvas has not changed


@dataclasses.dataclass(frozen=True)
class StableAndConfidentStop:
    """A row is done when its argmax canvas has been unchanged for ``stability_threshold``
    consecutive steps and the mean entropy of its tempered logits is < ``confidence_threshold``.

    Equivalent to transformers' ``StableAndConfidentStoppingCriteria`` (which keeps the last
    ``stability_threshold`` canvases); ``init`` plays the role of its ``reset`` (once per canvas).
    Each threshold is a scalar or one per row ([B]).
    """

    stability_threshold: int | jax.Array
    confidence_threshold: float | jax.Array

    def init(self, batch: int, length: int) -> StopState:
        return StopState(jnp.full((batch, length), -1, jnp.int32), jnp.zeros((batch,), jnp.int32))

    def update(self, state: StopState, argmax_canvas: jax.Array, entropies: jax.Array,
               free: jax.Array | None = None) -> tuple[StopState, jax.Array]:
        """argmax canvas [B, L] and entropies of the tempered logits [B, L] of this step
        -> (state, done [B] bool). ``free`` [B, L] bool (default all): the positions whose mean
        entropy is judged (infilling leaves clamped positions out).

        ``done`` is this step's decision only; keeping finished rows finished is the caller's job.
        """
        unchanged = jnp.all(argmax_canvas == state.previous, axis=-1)  # [B]
        steps = jnp.where(unchanged, jnp.minimum(state.unchanged_steps + 1, self.stability_threshold), 0)
        if free is None:
            mean_entropy = jnp.mean(entropies, axis=-1)
        else:
            mean_entropy = jnp.sum(jnp.where(free, entropies, 0.0), -1) / jnp.maximum(jnp.sum(free, -1), 1)
        confident = mean_entropy < jnp.asarray(self.confidence_threshold, jnp.float32)  # [B]
        done = (steps >= self.stability_threshold) & confident
        return StopState(argmax_canvas.astype(jnp.int32), steps), done


def tokens_per_forward(sequences, forward_passes, prompt_length: int, pad_token_id: int | None) -> jax.Array:
    """Generated tokens that are not pad, divided by the decoder passes each row ran: float32 [B].

    ``sequences`` [B, T + N] (prompt + generated), ``forward_passes`` [B] int.
    """
    new = jnp.asarray(sequences)[:, prompt_length:]
    passes = jnp.asarray(forward_passes, jnp.float32)
    if pad_token_id is None:  # torch's `int / tensor` is `int * tensor.reciprocal()`
        return jnp.float32(new.shape[1]) * (1.0 / passes)
    return jnp.sum(new != pad_token_id, axis=-1).astype(jnp.float32) / passes


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Sampler settings; defaults are transformers' ``DiffusionGemmaGenerationConfig`` defaults.

    ``top_k``/``top_p`` (off by default) filter the candidate draw only.
    """

    max_denoising_steps: int = 48
    t_min: float = 0.4
    t_max: float = 0.8
    entropy_bound: float = 0.1
    stability_threshold: int = 1
    confidence_threshold: float = 0.005
    top_k: int = 0
    top_p: float = 1.0

    def validate(self) -> "SamplerConfig":
        """Raises ValueError naming the first bad parameter; returns self."""
        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        checks = (
            ("max_denoising_steps", is_int(self.max_denoising_steps) and self.max_denoising_steps >= 1,
             "an integer >= 1"),
            ("t_min", self.t_min >= 0, ">= 0"),
            ("t_max", self.t_max >= self.t_min and self.t_max > 0, f"> 0 and >= t_min ({self.t_min})"),
            ("entropy_bound", self.entropy_bound >= 0, ">= 0"),
            ("stability_threshold", is_int(self.stability_threshold) and self.stability_threshold >= 0,
             "an integer >= 0"),
            ("confidence_threshold", self.confidence_threshold >= 0, ">= 0"),
            ("top_k", is_int(self.top_k) and self.top_k >= 0, "an integer >= 0 (0 disables)"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1] (1 disables)"),
        )
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")
        return self

    @classmethod
    def from_generation_config(cls, generation_config: dict[str, Any], **overrides) -> "SamplerConfig":
        """Reads a ``generation_config.json`` dict (missing or null keys take the defaults, the
        entropy bound comes from ``sampler_config.entropy_bound``), then applies ``overrides``
        (None = keep). Unknown override keys raise ValueError. The result is validated."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise ValueError(f"unknown sampler parameter(s) {unknown}; expected some of {names}")
        values = {k: generation_config[k] for k in names if generation_config.get(k) is not None}
        bound = (generation_config.get("sampler_config") or {}).get("entropy_bound")
        if bound is not None:
            values["entropy_bound"] = bound
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values).validate()

    @property
    def filters(self) -> tuple[int, float]:
        """(top_k, top_p): the candidate filters, static under jit."""
        return self.top_k, self.top_p

    def params(self, batch: int) -> "SamplerParams":
        """These settings for every row of a batch of ``batch``, as traced arrays."""
        return SamplerParams.stack([self] * batch)

    def schedule(self) -> LinearTemperature:
        return LinearTemperature.between(self.t_min, self.t_max, self.max_denoising_steps)

    def acceptance(self) -> EntropyBoundAcceptance:
        return EntropyBoundAcceptance(self.entropy_bound)

    def stop(self) -> StableAndConfidentStop:
        return StableAndConfidentStop(self.stability_threshold, self.confidence_threshold)


class SamplerParams(NamedTuple):
    """Per-row sampler settings as arrays (a pytree), so rows with different settings share one batch
    and one compiled program. Built on the host by ``stack``; ``top_k``/``top_p`` stay static."""

    t_min: jax.Array  # [B] float32
    t_span: jax.Array  # [B] float32: t_max - t_min, rounded once from float64
    max_steps: jax.Array  # [B] int32: max_denoising_steps
    entropy_bound: jax.Array  # [B] float32
    stability_threshold: jax.Array  # [B] int32
    confidence_threshold: jax.Array  # [B] float32

    @classmethod
    def stack(cls, configs: Sequence[SamplerConfig]) -> "SamplerParams":
        """One row per config (host numpy arrays)."""
        def col(fn, dtype):
            return np.asarray([fn(c) for c in configs], np.float64).astype(dtype)

        return cls(col(lambda c: c.t_min, np.float32), col(lambda c: c.t_max - c.t_min, np.float32),
                   col(lambda c: c.max_denoising_steps, np.int32), col(lambda c: c.entropy_bound, np.float32),
                   col(lambda c: c.stability_threshold, np.int32), col(lambda c: c.confidence_threshold, np.float32))

    def schedule(self) -> LinearTemperature:
        return LinearTemperature(self.t_min, self.t_span, self.max_steps)

    def acceptance(self) -> EntropyBoundAcceptance:
        return EntropyBoundAcceptance(self.entropy_bound)

    def stop(self) -> StableAndConfidentStop:
        return StableAndConfidentStop(self.stability_threshold, self.confidence_threshold)
