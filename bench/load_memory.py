"""Peak host memory of ``dgemma_jax.from_pretrained`` on a sharded ~1 GB checkpoint.

Run (from the repository root):

    PYTHONPATH=. .venv/bin/python bench/load_memory.py                   # float32 checkpoint, float32 load
    PYTHONPATH=. .venv/bin/python bench/load_memory.py --dtype bfloat16  # bf16 checkpoint, bf16 load

The claim under test (dgemma_jax/checkpoint.py): loading streams one tensor at a time, so peak host
memory stays near one copy of the weights. The library reads each tensor with ``readinto`` straight
into a 64-byte aligned buffer (no memory map), makes at most one more aligned copy where the layout or
dtype changes, and hands that buffer to ``jax.device_put``, which XLA:CPU adopts without copying.

How it measures. This process only orchestrates and never imports jax, so that no child inherits a large
high-water mark from it:
  1. a child process builds a random model with ``dgemma_jax.from_config(cfg, dtype=...)`` and writes it
     with ``save_pretrained(dir, max_shard_size=...)`` (safetensors shards + index json);
  2. a FRESH child process imports jax and dgemma_jax, initialises the CPU backend, records its RSS
     (the baseline), calls ``dgemma_jax.from_pretrained(dir, dtype=...)`` and reports
     ``getrusage(RUSAGE_SELF).ru_maxrss`` (the peak). A sampling thread reads /proc/self/status every
     few milliseconds to split the peak into anonymous memory (numpy / XLA buffers) and file-backed
     memory (mapped files: shared libraries, and any mmapped safetensors pages, which would count as
     RSS while a shard is open; the library's loader maps none, so this should stay near the baseline).

On the CPU backend the loaded parameters themselves live in host memory, so the floor is
``(peak - baseline) / checkpoint bytes`` = 1.0; everything above it is transient copies or mapped pages.
The defaults write ~1.08 GB in float32 (7 layers) or ~1.02 GB in bfloat16 (14 layers).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="checkpoint dtype (written) and load dtype")
    p.add_argument("--load-dtype", default=None, help="load with this dtype instead (e.g. to test a cast)")
    p.add_argument("--shard-size", default="200MB", help="save_pretrained max_shard_size")
    p.add_argument("--dir", default=None, help="checkpoint directory (default: a temporary one, deleted)")
    p.add_argument("--reuse", action="store_true", help="reuse an existing checkpoint in --dir")
    # model shape: about 1.08 GB (7 layers, float32) or 1.02 GB (14 layers, bfloat16) with these defaults
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=None, help="default: 7 (float32) or 14 (bfloat16)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--global-head-dim", type=int, default=256)
    p.add_argument("--global-kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--moe-intermediate", type=int, default=384)
    p.add_argument("--vocab", type=int, default=32768)
    # internal: child roles
    p.add_argument("--_write", dest="write_dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_load", dest="load_dir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.layers is None:
        args.layers = 7 if args.dtype == "float32" else 14
    return args


# ---- memory probes (no third-party imports) -------------------------------------------------------


def status_kb() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0])
    return out


def maxrss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


class Sampler:
    """Polls /proc/self/status; remembers the sample with the largest VmRSS and the largest of each part."""

    def __init__(self, period_s: float = 0.002):
        import threading

        self.period_s = period_s
        self.peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
        self.at_peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            s = status_kb()
            for k in self.peak:
                self.peak[k] = max(self.peak[k], s.get(k, 0))
            if s["VmRSS"] >= self.at_peak.get("VmRSS", 0):
                self.at_peak = s
            time.sleep(self.period_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# ---- child: write ----------------------------------------------------------------------------------


def model_config(args):
    from dgemma_jax.config import FULL, SLIDING, ModelConfig

    types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(args.layers)]
    types[-1] = FULL
    return ModelConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_heads=args.heads, head_dim=args.head_dim, num_kv_heads=args.kv_heads,
        global_head_dim=args.global_head_dim, num_global_kv_heads=args.global_kv_heads,
        layer_types=tuple(types), sliding_window=512, num_experts=args.experts,
        num_experts_per_tok=args.top_k, moe_intermediate_size=args.moe_intermediate, canvas_length=64,
    )


def child_write(args) -> None:
    import dgemma_jax

    model = dgemma_jax.from_config(model_config(args), seed=0, dtype=args.dtype)
    model.save_pretrained(args.write_dir, max_shard_size=args.shard_size)


# ---- child: load -----------------------------------------------------------------------------------


def child_load(args) -> None:
    start_maxrss = maxrss_bytes()
    import jax

    import dgemma_jax

    jax.devices()  # initialise the CPU backend inside the baseline
    import numpy as np

    np.zeros(1)
    base = status_kb()
    base_maxrss = maxrss_bytes()
    dtype = args.load_dtype or args.dtype
    t0 = time.perf_counter()
    with Sampler() as sampler:
        model = dgemma_jax.from_pretrained(args.load_dir, dtype=dtype)
        leaves = jax.tree_util.tree_leaves(model.state)
        jax.block_until_ready(leaves)
    seconds = time.perf_counter() - t0
    after = status_kb()
    param_bytes = sum(x.nbytes for x in leaves)
    peak = maxrss_bytes()
    print("RESULT " + json.dumps(dict(
        start_maxrss=start_maxrss, base_rss=base["VmRSS"] * 1024,
        base_anon=base["RssAnon"] * 1024, base_file=base["RssFile"] * 1024, base_maxrss=base_maxrss,
        peak=peak, sampled_peak=sampler.at_peak.get("VmRSS", 0) * 1024,
        sampled_anon_at_peak=sampler.at_peak.get("RssAnon", 0) * 1024,
        sampled_file_at_peak=sampler.at_peak.get("RssFile", 0) * 1024,
        sampled_max_anon=sampler.peak["RssAnon"] * 1024, sampled_max_file=sampler.peak["RssFile"] * 1024,
        after_rss=after["VmRSS"] * 1024, after_anon=after["RssAnon"] * 1024, param_bytes=param_bytes,
        seconds=seconds, dtype=str(dtype), jax=jax.__version__,
    )), flush=True)


# ---- orchestrator ----------------------------------------------------------------------------------


def run_child(extra: list[str], argv: list[str]) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("JAX_PLATFORMS", "cpu")
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"child failed ({proc.returncode}): {' '.join(cmd)}")
    return proc.stdout


def mib(n: float) -> str:
    return f"{n / 2**20:8.1f} MiB"


def checkpoint_summary(path: Path) -> tuple[int, int, int, int]:
    """(total file bytes, tensor bytes, number of shards, largest tensor bytes) of a snapshot."""
    import struct

    files = sorted(path.glob("*.safetensors"))
    total = sum(f.stat().st_size for f in files)
    tensor_bytes, largest = 0, 0
    for f in files:
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        for key, info in header.items():
            if key == "__metadata__":
                continue
            size = info["data_offsets"][1] - info["data_offsets"][0]
            tensor_bytes += size
            largest = max(largest, size)
    return total, tensor_bytes, len(files), largest


def main(argv=None) -> int:
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(raw_argv)
    if args.write_dir:
        child_write(args)
        return 0
    if args.load_dir:
        child_load(args)
        return 0

    common = [a for a in raw_argv if a != "--reuse"]
    tmp = None
    if args.dir:
        ckpt = Path(args.dir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="dgemma-loadmem-")
        ckpt = Path(tmp.name) / "ckpt"
    try:
        if not (args.reuse and (ckpt / "config.json").is_file()):
            t0 = time.perf_counter()
            run_child(["--_write", str(ckpt)], common)
            print(f"wrote {ckpt} in {time.perf_counter() - t0:.1f}s")
        total, tensor_bytes, shards, largest = checkpoint_summary(ckpt)
        index = (ckpt / "model.safetensors.index.json").is_file()
        print(f"checkpoint: {total} bytes ({total / 1e9:.3f} GB) in {shards} shards (index json: {index}); "
              f"tensor bytes {tensor_bytes}; largest tensor {mib(largest).strip()}; "
              f"dtype {args.dtype}, load dtype {args.load_dtype or args.dtype}")
        out = run_child(["--_load", str(ckpt)], common)
        line = next(l for l in out.splitlines() if l.startswith("RESULT "))
        r = json.loads(line[len("RESULT "):])
        print(f"machine: {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.1f} GiB RAM; "
              f"python {sys.version.split()[0]}, jax {r['jax']}")
        print(f"loaded parameter bytes (sum of leaves): {r['param_bytes']} "
              f"({r['param_bytes'] / tensor_bytes:.3f} x checkpoint tensor bytes)")
        print()
        grow = r["peak"] - r["base_rss"]
        print(f"[dgemma_jax.from_pretrained]  {r['seconds']:.2f}s")
        print(f"  checkpoint bytes                {mib(total)}")
        print(f"  baseline RSS (after import jax, dgemma_jax, backend init) {mib(r['base_rss']).strip()} "
              f"(anon {mib(r['base_anon']).strip()}, file {mib(r['base_file']).strip()}; "
              f"ru_maxrss at process start {mib(r['start_maxrss']).strip()})")
        print(f"  peak RSS (ru_maxrss)            {mib(r['peak'])}")
        print(f"  peak RSS sampled (2 ms)         {mib(r['sampled_peak'])}  = anon {mib(r['sampled_anon_at_peak']).strip()}"
              f" + file-backed {mib(r['sampled_file_at_peak']).strip()}  (max file-backed seen {mib(r['sampled_max_file']).strip()})")
        print(f"  RSS after load                  {mib(r['after_rss'])}  (anon {mib(r['after_anon']).strip()})")
        print(f"  (peak - baseline) / ckpt bytes  {grow / total:8.3f}")
        print(f"  (after - baseline) / ckpt bytes {(r['after_rss'] - r['base_rss']) / total:8.3f}")
        if (args.load_dtype or args.dtype) != args.dtype:  # a cast on load: compare with the loaded size too
            print(f"  (peak - baseline) / loaded bytes {grow / r['param_bytes']:7.3f}")
        anon_extra = r["sampled_anon_at_peak"] - r["after_anon"]
        file_extra = r["sampled_file_at_peak"] - r["base_file"]
        print(f"  peak above the loaded weights   {mib(r['peak'] - r['after_rss'])}  = "
              f"{(r['peak'] - r['after_rss']) / largest:.2f} x the largest tensor; at the sampled peak: "
              f"anon temporaries {mib(anon_extra).strip()} + file-backed pages {mib(file_extra).strip()}")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
