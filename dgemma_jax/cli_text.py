"""``dgemma generate``, ``dgemma chat`` and ``dgemma infill``: text in, text out.

Each loads ``--model DIR`` (a Hugging Face snapshot with its tokenizer) or, without it, the embedded
default model; takes the sampler flags (unset = the checkpoint's ``generation_config.json``);
prints the text to stdout and timings / notes to stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

import numpy as np

_SAMPLER_FLAGS = (  # (flag, generate() keyword, type, help)
    ("--steps", "max_denoising_steps", int, "most denoising steps per canvas"),
    ("--entropy-bound", "entropy_bound", float, "entropy budget of the tokens accepted per step"),
    ("--t-min", "t_min", float, "temperature floor of the linear schedule"),
    ("--t-max", "t_max", float, "temperature of the first step"),
    ("--confidence-threshold", "confidence_threshold", float,
     "stop a canvas when its mean entropy is below this (0 disables adaptive stopping)"),
    ("--stability-threshold", "stability_threshold", int, "... and its argmax has been unchanged this many steps"),
    ("--top-k", "top_k", int, "draw candidates from the k most likely tokens only"),
    ("--top-p", "top_p", float, "draw candidates from the nucleus of this probability mass only"),
)


def add_parsers(sub) -> None:
    """Registers generate, chat and infill on the ``dgemma`` subparsers."""
    p = sub.add_parser("generate", help="continue one or more prompts",
                       description="Generate text after each PROMPT (raw text; --chat wraps it as a user turn).")
    p.add_argument("prompts", nargs="+", metavar="PROMPT")
    p.add_argument("--chat", action="store_true", help="format each prompt with the checkpoint's chat template")
    p.add_argument("--show-denoising", action="store_true",
                   help="redraw the canvas after every denoising step (slower: one host round trip per step)")
    _common(p, max_new_tokens=None)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="multi-turn chat (reads user turns from stdin, one per line)",
                       description="Chat with the model. Each line of stdin is a user turn; the reply streams "
                                   "canvas by canvas. Thoughts are stripped from the history.")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--think", action="store_true", help="enable thinking (<|think|> in the system turn)")
    p.add_argument("--show-thoughts", action="store_true", help="print the model's thoughts to stderr")
    _common(p, max_new_tokens=None)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("infill", help="write the text between a prefix and a suffix",
                       description="Write --length tokens between PREFIX and SUFFIX: the suffix tokens are "
                                   "clamped in the canvas, so the middle is written seeing both sides.")
    p.add_argument("--prefix", required=True)
    p.add_argument("--suffix", required=True)
    p.add_argument("--length", type=int, default=None,
                   help="tokens to write (default: fill the rest of one canvas after the suffix)")
    _common(p, max_new_tokens=False)
    p.set_defaults(func=cmd_infill)


def _common(p: argparse.ArgumentParser, max_new_tokens) -> None:
    p.add_argument("--model", metavar="DIR", default=None,
                   help="Hugging Face snapshot directory (default: the embedded default model)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="parameter dtype (default: the checkpoint's, else bfloat16)")
    p.add_argument("--quantize", choices=("none", "int8"), default="none",
                   help="int8: weight-only int8 experts with per-channel scales (default: %(default)s)")
    add_backend_flags(p)
    p.add_argument("--seed", type=int, default=0)
    if max_new_tokens is not False:
        p.add_argument("--max-new-tokens", type=int, default=max_new_tokens,
                       help="tokens to generate (default: the checkpoint's generation_config.json, else 256)")
    group = p.add_argument_group("sampler (default: the checkpoint's generation_config.json)")
    for flag, key, kind, text in _SAMPLER_FLAGS:
        group.add_argument(flag, dest=key, type=kind, default=None, help=text)


def add_backend_flags(p: argparse.ArgumentParser) -> None:
    """``--moe-impl`` / ``--attention-impl``: the model's back ends (``from_pretrained`` switches)."""
    from dgemma_jax.config import ATTENTION_IMPLS, MOE_IMPLS

    p.add_argument("--moe-impl", choices=MOE_IMPLS, default=None,
                   help="MoE back end (default: the config's, auto: pallas on TPU, bucketed on GPU, tiled on CPU)")
    p.add_argument("--attention-impl", choices=ATTENTION_IMPLS, default=None,
                   help="attention back end (default: the config's, xla)")


def _sampler(args) -> dict:
    """The sampler flags given on the command line, as ``generate`` keywords."""
    return {key: getattr(args, key) for _, key, _, _ in _SAMPLER_FLAGS if getattr(args, key) is not None}


def _load(args, mesh=None):
    """-> (model, tokenizer): ``--model`` or the embedded default model (on ``mesh`` if given)."""
    import dgemma_jax
    from dgemma_jax.cli import _source_dtype
    from dgemma_jax.default_model import default_model_dir
    from dgemma_jax.tokenizer import Tokenizer

    path = Path(args.model) if args.model else default_model_dir()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: not a directory (expected a Hugging Face snapshot)")
    recorded = _source_dtype(path)
    dtype = args.dtype or (recorded if recorded in ("bfloat16", "float32") else "bfloat16")
    backends = {key: getattr(args, key, None) for key in ("moe_impl", "attention_impl")}
    model = dgemma_jax.from_pretrained(path, dtype=dtype, mesh=mesh, quantize=args.quantize,
                                       **{key: value for key, value in backends.items() if value})
    return model, Tokenizer.load(path)


def _report(result) -> None:
    canvas = np.mean(result.canvas_seconds) if result.canvas_seconds else 0.0
    tpf = ", ".join(f"{x:.2f}" for x in result.tokens_per_forward)
    spc = ", ".join(f"{x:.1f}" for x in result.steps_per_canvas)
    print(f"[{len(result.canvas_seconds)} canvas(es); tokens/forward {tpf}; steps/canvas {spc}; "
          f"prefill {result.prefill_seconds * 1e3:.0f} ms; {canvas * 1e3:.0f} ms/canvas]", file=sys.stderr)


def _visible(tokenizer, ids) -> str:
    """Decoded text of generated ids, cut at the end of the turn, pads and specials dropped."""
    from dgemma_jax.chat import split_thoughts

    return split_thoughts(tokenizer.decode([int(t) for t in ids if t != tokenizer.pad_id]))[0]


class _CanvasView:
    """Redraws the argmax canvas of row 0 after every denoising step (in place on a terminal)."""

    def __init__(self, tokenizer, out: TextIO | None = None):
        self.tokenizer, self.out, self.lines = tokenizer, out or sys.stderr, 0
        self.live = self.out.isatty()

    def __call__(self, step) -> None:
        text = self.tokenizer.decode(step.argmax_canvas[0].tolist()).replace("\n", "⏎")
        line = f"[canvas {step.canvas_index} step {step.step:2d}] {text}"
        if self.live:
            self.out.write("\033[1F\033[2K" * self.lines + line + "\n")
            self.lines = 1
        else:
            self.out.write(line + "\n")
        self.out.flush()


def cmd_generate(args) -> int:
    import dgemma_jax
    from dgemma_jax.chat import ChatTemplate

    model, tokenizer = _load(args)
    if args.chat:
        template = ChatTemplate.load(model.source_dir)
        texts = [template.render([{"role": "user", "content": p}]) for p in args.prompts]
        prompts = [tokenizer.encode(t) for t in texts]  # the template writes <bos>
    else:
        prompts = [tokenizer.encode(p, add_bos=True) for p in args.prompts]
    view = _CanvasView(tokenizer) if args.show_denoising else None
    result = dgemma_jax.generate(model, prompts, max_new_tokens=args.max_new_tokens, seed=args.seed, on_step=view,
                                 **_sampler(args))
    width = max(map(len, prompts))
    for row in result.sequences:
        print(_visible(tokenizer, row[width:]))
    _report(result)
    return 0


def cmd_chat(args) -> int:
    import dgemma_jax
    from dgemma_jax.chat import ChatTemplate, Conversation, split_thoughts

    model, tokenizer = _load(args)
    chat = Conversation(ChatTemplate.load(model.source_dir), system=args.system, enable_thinking=args.think)
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line:
            break
        if not line.strip():
            continue
        ids = tokenizer.encode(chat.prompt(line.rstrip("\n")))
        shown, generated = "", []

        def stream(index, tokens):
            nonlocal shown
            generated.extend(tokens[0].tolist())
            text = _visible(tokenizer, generated)
            if text.startswith(shown):  # print what is new (decoding can revise a word's spacing)
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text

        result = dgemma_jax.generate(model, [ids], max_new_tokens=args.max_new_tokens, seed=args.seed,
                                     on_canvas=stream, **_sampler(args))
        raw = tokenizer.decode([t for t in generated if t != tokenizer.pad_id])
        answer = chat.add_reply(raw)
        sys.stdout.write(answer[len(shown):] if answer.startswith(shown) else "\n" + answer)
        print(flush=True)
        if args.show_thoughts:
            print(f"[thoughts] {split_thoughts(raw)[1]}", file=sys.stderr)
        _report(result)
    return 0


def cmd_infill(args) -> int:
    import dgemma_jax

    model, tokenizer = _load(args)
    prefix = tokenizer.encode(args.prefix, add_bos=True)
    suffix = tokenizer.encode(args.suffix)
    length = args.length
    if length is None:
        length = max(model.config.canvas_length - len(suffix), 1)
    middle = dgemma_jax.infill(model, prefix, suffix, length, seed=args.seed, **_sampler(args))
    text = tokenizer.decode(middle, skip_special_tokens=True)
    if sys.stdout.isatty():
        text = f"\033[1m{text}\033[0m"
    print(f"{args.prefix}{text}{args.suffix}")
    return 0
