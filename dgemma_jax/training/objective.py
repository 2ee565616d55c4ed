"""The fine-tuning objective (SPEC §5): uniform-state diffusion loss + the encoder's AR loss.

A training row is ``prompt (p tokens) | response canvases (C * L tokens) | padding``:

* the **encoder pass** runs causally over the clean row; it fills the K/V cache and its logits at
  positions ``p - 1 .. p + C*L - 2`` predict the response (the AR loss);
* each canvas ``c`` is **corrupted** (every supervised token replaced by a uniform random token with
  probability ``t``, one ``t ~ U(eps, 1)`` per example) and denoised against the cache cut at
  ``p + c*L``: it sees the prompt and the *clean* earlier canvases, and its own positions continue
  from there, exactly as at generation time;
* **self-conditioning**: a first canvas pass without gradient and with zero signal; per example,
  with probability ``p_self_cond``, its logits feed the second pass, otherwise the signal is exactly
  zero (the model's ``self_conditioning_mask``).

Losses are flat means over the supervised positions of the batch (no 1/t weight).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from dgemma_jax.cache import KVCache
from dgemma_jax.model import DiffusionGemma


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """``t_min``: the ε of t ~ U(ε, 1). ``ar_weight``: weight of the encoder's AR loss.
    ``p_self_cond``: probability that an example trains with the self-conditioning signal."""

    t_min: float = 1e-3
    ar_weight: float = 1.0
    p_self_cond: float = 0.5

    def __post_init__(self):
        if not 0.0 <= self.t_min < 1.0:
            raise ValueError(f"t_min={self.t_min}: must be in [0, 1)")
        if self.ar_weight < 0:
            raise ValueError(f"ar_weight={self.ar_weight}: must be >= 0")
        if not 0.0 <= self.p_self_cond <= 1.0:
            raise ValueError(f"p_self_cond={self.p_self_cond}: must be in [0, 1]")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Noise:
    """The random draws of one training step: noisy canvases [B, C*L] and who self-conditions [B]."""

    canvases: jax.Array
    self_cond: jax.Array


def response_of(tokens: jax.Array, prompt_len: jax.Array, length: int) -> jax.Array:
    """tokens [B, S], prompt_len [B] -> the ``length`` tokens after each row's prompt, [B, length]."""
    return jax.vmap(lambda row, p: jax.lax.dynamic_slice_in_dim(row, p, length))(tokens, prompt_len)


def draw_noise(key: jax.Array, response: jax.Array, loss_mask: jax.Array, vocab_size: int,
               cfg: ObjectiveConfig) -> Noise:
    """Corrupts the supervised tokens of ``response`` [B, C*L]: one t per example."""
    b = response.shape[0]
    k_t, k_flip, k_tok, k_sc = jax.random.split(key, 4)
    t = jax.random.uniform(k_t, (b, 1), minval=cfg.t_min, maxval=1.0)
    flip = (jax.random.uniform(k_flip, response.shape) < t) & (loss_mask > 0)
    random_tokens = jax.random.randint(k_tok, response.shape, 0, vocab_size, response.dtype)
    self_cond = jax.random.uniform(k_sc, (b,)) < cfg.p_self_cond
    return Noise(jnp.where(flip, random_tokens, response), self_cond)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """logits [..., V] float32, targets [...] -> per-position -log p(target)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    mask = mask.astype(jnp.float32)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def head_cross_entropy(model: DiffusionGemma, hidden: jax.Array, targets: jax.Array) -> jax.Array:
    """Final hidden states [B, T, H], targets [B, T] -> per-position -log p(target) [B, T].

    With ``config.remat`` the float32 logits and their log-softmax are recomputed in the backward
    pass: only ``hidden`` is kept, not [B, T, V] floats."""
    def head(hidden):
        return cross_entropy(model.logits(hidden), targets)

    return (jax.checkpoint(head) if model.config.remat else head)(hidden)


def losses(model: DiffusionGemma, tokens: jax.Array, prompt_len: jax.Array, loss_mask: jax.Array,
           noise: Noise, cfg: ObjectiveConfig) -> dict[str, jax.Array]:
    """The objective for given noise. tokens [B, S], prompt_len [B], loss_mask [B, C*L] (float).

    Returns ``loss`` (diffusion + ar_weight * ar), ``diffusion`` and ``ar`` (flat means).
    """
    b, s = tokens.shape
    n = loss_mask.shape[1]
    length = model.config.canvas_length
    if n % length:
        raise ValueError(f"loss_mask has {n} positions, not a whole number of canvases of {length}")
    response = response_of(tokens, prompt_len, n)  # [B, C*L]
    if cfg.ar_weight:
        cache = KVCache.for_positions(model.config, b, s, model.dtype)
        hidden, cache = model.encode(tokens, cache, prompt_len + n)  # [B, S, H]
        before = response_of(hidden, prompt_len - 1, n)  # [B, C*L, H]: hidden states predicting the response
    else:  # no AR loss: encode only what some canvas attends to (the last canvas is never read)
        cache = KVCache.for_positions(model.config, b, s - length, model.dtype)
        _, cache = model.encode(tokens[:, : s - length], cache, prompt_len + n - length)
        before = None

    def canvas_ce(_, xs):  # canvas c against the cache cut at p + c*L: the prompt and clean canvases < c
        c, canvas, target, before_c = xs  # [], [B, L], [B, L], [B, L, H] or None
        cut = dataclasses.replace(cache, length=prompt_len + c * length)
        first = jax.lax.stop_gradient(model.denoise(canvas, cut))
        hidden = model.denoise_hidden(canvas, cut, first, noise.self_cond)
        ar_ce = None if before_c is None else head_cross_entropy(model, before_c, target)
        return None, (head_cross_entropy(model, hidden, target), ar_ce)

    # a scan over the canvases: the gradient sums each layer's cache gradient over the canvases as it
    # goes (one accumulator), and the step holds one canvas pass, not C of them; the AR loss's logits
    # are taken a canvas's positions at a time in the same scan
    def by_canvas(x):  # [B, C*L, ...] -> [C, B, L, ...]
        return None if x is None else x.reshape(b, -1, length, *x.shape[2:]).swapaxes(0, 1)

    def flat(ce):  # [C, B, L] -> [B, C*L]
        return ce.swapaxes(0, 1).reshape(b, n)

    canvas_ids = jnp.arange(n // length, dtype=jnp.int32)
    _, (ce, ar_ce) = jax.lax.scan(canvas_ce, None, (canvas_ids, *map(by_canvas, (noise.canvases, response, before))))
    diffusion = masked_mean(flat(ce), loss_mask)
    ar = jnp.zeros((), jnp.float32) if ar_ce is None else masked_mean(flat(ar_ce), loss_mask)
    return dict(loss=diffusion + cfg.ar_weight * ar, diffusion=diffusion, ar=ar)
