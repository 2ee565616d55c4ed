"""Load test of ``dgemma serve``: N concurrent clients for a fixed time, next to one-at-a-time ``generate``.

Run (from the repository root):

    PYTHONPATH=. .venv/bin/python bench/serve_load.py [--model DIR] [--seconds 20] [--concurrency 1,4,16,64]

For each concurrency N, two sides get the same load for ``--seconds``: N client threads, each sending
requests back to back (a prompt of ``--prompt-tokens`` random token ids, ``max_tokens`` =
``--max-tokens``, a fresh seed per request), and the full sampler.
  server     the OpenAI server on loopback (``--slots`` batch slots, continuous batching), called with
             the official openai client; a request is timed from send to the whole response
  generate   the same requests through ``dgemma_jax.generate``, one at a time (a lock, no HTTP): what
             serving without a batching engine gives
Printed per side: completed requests, errors (target 0), p50 / p99 latency and aggregate generated
tokens/s. ``--model`` defaults to the embedded default model. The server's cache is sized for the
workload (``--max-prompt-tokens`` = the prompt length, ``--max-tokens`` = max_tokens), as a deployment
would size it: every slot attends over the whole preallocated cache.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time


def run_load(call, concurrency: int, seconds: float, make_request) -> dict:
    """``concurrency`` threads call ``call(request) -> generated tokens`` back to back for ``seconds``."""
    latencies, tokens, errors, lock = [], [0], [0], threading.Lock()
    stop_at = time.perf_counter() + seconds

    def client(k: int):
        i = 0
        while time.perf_counter() < stop_at:
            request = make_request(k * 100_000 + i)
            i += 1
            t0 = time.perf_counter()
            try:
                n = call(request)
            except Exception as e:  # noqa: BLE001 - counted and reported
                with lock:
                    errors[0] += 1
                    if errors[0] <= 3:
                        print(f"  error: {type(e).__name__}: {e}")
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)
                tokens[0] += n

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0  # includes the requests still running at the deadline
    import numpy as np

    lat = np.asarray(latencies) if latencies else np.asarray([np.nan])
    return dict(done=len(latencies), errors=errors[0], p50=float(np.percentile(lat, 50)),
                p99=float(np.percentile(lat, 99)), tokens_per_s=tokens[0] / wall)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="snapshot directory (default: the embedded default model)")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=24)
    p.add_argument("--max-tokens", type=int, default=None, help="default: one canvas")
    args = p.parse_args(argv)

    import jax
    import numpy as np
    import openai
    import uvicorn

    import dgemma_jax
    from dgemma_jax.cli_serve import add_parsers, build_server

    from pathlib import Path

    from dgemma_jax.config import load_hf_config
    from dgemma_jax.default_model import default_model_dir

    canvas = load_hf_config(Path(args.model) if args.model else default_model_dir())[0].canvas_length
    max_tokens = args.max_tokens or canvas
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers())
    # The cache is sized for this workload (every slot attends over the whole preallocated cache).
    serve_args = parser.parse_args(["serve", "--slots", str(args.slots), "--max-queue", "1024", "--max-prompt-tokens",
                                    str(args.prompt_tokens), "--max-tokens", str(max_tokens)]
                                   + (["--model", args.model] if args.model else []))
    server, engine = build_server(serve_args)
    model = engine.model
    vocab = model.config.vocab_size
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = "http://127.0.0.1:%d/v1" % sock.getsockname()[1]
    http = uvicorn.Server(uvicorn.Config(server.app, log_level="warning"))
    threading.Thread(target=http.run, kwargs=dict(sockets=[sock]), daemon=True).start()
    while not http.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)

    def make_request(seed: int):
        rng = np.random.default_rng(seed)
        return [int(t) for t in rng.integers(5, vocab, args.prompt_tokens)], seed

    def via_server(request) -> int:
        prompt, seed = request
        reply = client.completions.create(model=server.config.model_name, prompt=prompt, max_tokens=max_tokens,
                                          seed=seed)
        return reply.usage.completion_tokens

    one_at_a_time = threading.Lock()

    def via_generate(request) -> int:
        prompt, seed = request
        with one_at_a_time:
            out = dgemma_jax.generate(model, [prompt], max_new_tokens=max_tokens, seed=seed)
        generated = out.sequences[0, len(prompt):]
        return int((generated != model.config.pad_token_id).sum())

    via_generate(make_request(0))  # compile outside the timed runs (the server compiled at start)
    levels = [int(c) for c in args.concurrency.split(",")]
    print(f"model {model.source_dir} ({model.config.num_layers} layers, canvas {model.config.canvas_length}); "
          f"device {jax.devices()[0].device_kind}; {args.slots} slots; prompt "
          f"{args.prompt_tokens} tokens, max_tokens {max_tokens}; {args.seconds:g} s per run")
    print(f"{'clients':>7} {'side':<9} {'done':>6} {'errors':>6} {'p50 s':>8} {'p99 s':>8} {'tokens/s':>9}")
    for c in levels:
        rows = {"server": run_load(via_server, c, args.seconds, make_request),
                "generate": run_load(via_generate, c, args.seconds, make_request)}
        for side, r in rows.items():
            print(f"{c:>7} {side:<9} {r['done']:>6} {r['errors']:>6} {r['p50']:>8.2f} {r['p99']:>8.2f} "
                  f"{r['tokens_per_s']:>9.1f}")
        ratio = rows["server"]["tokens_per_s"] / max(rows["generate"]["tokens_per_s"], 1e-9)
        print(f"{c:>7} server / generate tokens/s: {ratio:.2f}x")
    http.should_exit = True
    engine.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
