"""``dgemma serve``: the OpenAI-compatible server (``dgemma_jax/serving``) on uvicorn."""

from __future__ import annotations

import argparse
import sys


def add_parsers(sub) -> None:
    from dgemma_jax.cli_text import add_backend_flags

    p = sub.add_parser(
        "serve", help="OpenAI-compatible HTTP server with continuous batching",
        description="Serve the model over HTTP: POST /v1/chat/completions, POST /v1/completions (suffix = "
                    "infilling), GET /v1/models, GET /health, GET /metrics. Requests share a fixed number of "
                    "batch slots and join and leave at canvas boundaries.")
    p.add_argument("--model", metavar="DIR", default=None,
                   help="Hugging Face snapshot directory (default: the embedded default model)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--mesh", default=None, metavar="AXIS=N,...",
                   help="device mesh for the weights and the batch, e.g. expert=8 or data=2,expert=4")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="parameter dtype (default: the checkpoint's, else bfloat16)")
    p.add_argument("--quantize", choices=("none", "int8"), default="none",
                   help="int8: weight-only int8 experts (default: %(default)s)")
    add_backend_flags(p)
    p.add_argument("--served-model-name", default=None,
                   help="the name clients pass as `model` (default: the model directory's name)")
    p.add_argument("--slots", type=int, default=4, help="requests denoised together (default: %(default)s)")
    p.add_argument("--max-prompt-tokens", type=int, default=2048, help="longest prompt (default: %(default)s)")
    p.add_argument("--max-tokens", type=int, default=1024,
                   help="largest max_tokens a request may ask for (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot; more get 429 (default: %(default)s)")
    p.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may take before it gets 408 (default: %(default)s)")
    p.add_argument("--weight-layouts", choices=("auto", "xla", "default"), default="auto",
                   help="xla: move the weights once into the layouts XLA picks for the denoising loop (needed "
                        "for the 26B loop to fit a TPU v5e chip; see docs/scaling.md); auto: xla on TPU, "
                        "default elsewhere (default: %(default)s)")
    p.add_argument("--no-warmup", action="store_true", help="do not compile before accepting requests")
    p.set_defaults(func=cmd_serve)


def build_server(args: argparse.Namespace):
    """(Server, Engine) for the parsed ``dgemma serve`` arguments; the engine is started."""
    from dgemma_jax.chat import ChatTemplate
    from dgemma_jax.cli_plan import parse_mesh
    from dgemma_jax.cli_text import _load
    from dgemma_jax.serving.engine import Engine, EngineConfig
    from dgemma_jax.serving.server import Server, ServerConfig
    from dgemma_jax.sharding import make_mesh

    mesh = make_mesh(parse_mesh(args.mesh)) if args.mesh else None
    model, tokenizer = _load(args, mesh)
    path = model.source_dir
    try:
        template = ChatTemplate.load(path)
    except FileNotFoundError:
        template = None
    engine = Engine(model, EngineConfig(slots=args.slots, max_prompt_tokens=args.max_prompt_tokens,
                                        max_new_tokens=args.max_tokens, max_queue=args.max_queue,
                                        weight_layouts=args.weight_layouts)).start()
    if not args.no_warmup:
        engine.warmup()
    server = Server(engine, tokenizer, template,
                    ServerConfig(model_name=args.served_model_name or path.name, request_timeout=args.request_timeout))
    return server, engine


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    server, engine = build_server(args)
    print(f"dgemma serve: model '{server.config.model_name}' on http://{args.host}:{args.port}/v1 "
          f"({engine.config.slots} slots)", file=sys.stderr)
    try:
        uvicorn.run(server.app, host=args.host, port=args.port, log_level="info")
    finally:
        engine.stop()
    return 0
