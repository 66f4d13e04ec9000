"""Forward+backward time and peak memory of local attention: ours against the alternatives.

    python bench/attention.py [--sizes 1024,4096,16384,65536] [--window 256]

Causal (window_size_right = 0), 4 heads, head_dim 64, batch 1, float32. Compared, each point in
a process of its own so that its peak memory is its own:

* ``ours``: `model.local_attention` (blocked, custom VJP);
* ``seed``: the per-query ``vmap`` algorithm of the original ``local_attention_flax``
  (re-implemented here: each query gathers its window of keys, O(n·w·d) memory);
* ``dense``: ``jax.nn.dot_product_attention(local_window_size=...)``, which masks a full
  (n, n) score matrix.

A point whose step needs more memory than ``--memory_cap_gib`` (by XLA's own buffer
assignment, known before it runs), or which runs out of memory or time, is reported as such.

Useful FLOPs are 4·n·(w+1)·d per head forward, ×3 for forward+backward; their rate is
compared with a large float32 matmul timed in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import (best_time, cap_memory, matmul_flops_per_second,  # noqa: E402
                          measure_in_subprocess, peak_rss_bytes, xla_bytes)

HEADS, HEAD_DIM = 4, 64
METHODS = ("ours", "seed", "dense")


def _seed_local_attention(q, k, v, window_left, window_right):
    """The original library's algorithm: vmap over queries, each gathering its own window."""
    import jax
    import jax.numpy as jnp

    n, d = q.shape[-2:]
    width = window_left + window_right + 1
    k_pad = jnp.pad(k, [(0, 0)] * (k.ndim - 2) + [(window_left, window_right), (0, 0)])
    v_pad = jnp.pad(v, [(0, 0)] * (v.ndim - 2) + [(window_left, window_right), (0, 0)])

    def one_query(q_i, i):
        keys = jax.lax.dynamic_slice_in_dim(k_pad, i, width, axis=-2)
        values = jax.lax.dynamic_slice_in_dim(v_pad, i, width, axis=-2)
        position = i - window_left + jnp.arange(width)
        scores = jnp.einsum("...d,...kd->...k", q_i, keys) / jnp.sqrt(d)
        scores = jnp.where((position >= 0) & (position < n), scores, -jnp.inf)
        return jnp.einsum("...k,...kd->...d", jax.nn.softmax(scores, axis=-1), values)

    return jax.vmap(one_query, in_axes=(-2, 0), out_axes=-2)(q, jnp.arange(n))


def _attention_fn(method: str, window: int):
    import jax
    import jax.numpy as jnp

    from model import local_attention

    if method == "ours":
        return lambda q, k, v: local_attention(q, k, v, window_size_left=window,
                                               window_size_right=0)
    if method == "seed":
        return lambda q, k, v: _seed_local_attention(q, k, v, window, 0)
    swap = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  (batch, seq, heads, dim) layout
    return lambda q, k, v: swap(jax.nn.dot_product_attention(
        swap(q), swap(k), swap(v), local_window_size=(window, 0)))


def run_point(method: str, seq_len: int, window: int, repeats: int, memory_cap: int) -> dict:
    """Times one (method, seq_len) forward+backward in this process; returns a result row.

    Memory is reported twice: ``xla_bytes``, what XLA's buffer assignment needs for the step
    (arguments, outputs and temporaries: what an accelerator would have to hold), and
    ``rss_bytes``, how far the process's peak resident memory grew while the step ran.
    """
    import jax

    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (1, HEADS, seq_len, HEAD_DIM)) for key in keys)
    attention = _attention_fn(method, window)
    step = jax.jit(jax.grad(lambda q, k, v: attention(q, k, v).sum(), argnums=(0, 1, 2)))
    compiled = step.lower(q, k, v).compile()
    row = {"method": method, "seq_len": seq_len, "xla_bytes": xla_bytes(compiled)}
    if row["xla_bytes"] > memory_cap:
        return row | {"failed": f"out of memory (needs {row['xla_bytes'] / 2**30:.0f} GiB)"}
    jax.block_until_ready((q, k, v))
    baseline = peak_rss_bytes()
    jax.block_until_ready(compiled(q, k, v))  # warm up
    seconds = best_time(lambda: jax.block_until_ready(compiled(q, k, v)), repeats)
    return row | {"seconds": seconds, "rss_bytes": peak_rss_bytes() - baseline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1024,4096,16384,65536")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per point")
    parser.add_argument("--memory_cap_gib", type=float, default=20.0,
                        help="address space allowed to one point's process")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--point", help=argparse.SUPPRESS)  # internal: run one point
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]

    if args.point:
        cap = cap_memory(args.memory_cap_gib)
        print(json.dumps(run_point(args.point, sizes[0], args.window, args.repeats, cap)))
        return

    matmul_rate = matmul_flops_per_second()
    print(f"float32 matmul (4096²): {matmul_rate / 1e9:.1f} GFLOP/s; window {args.window}, "
          f"{HEADS} heads, head_dim {HEAD_DIM}, causal, forward+backward")
    rows = []
    for seq_len in sizes:
        for method in args.methods.split(","):
            row = measure_in_subprocess(
                __file__, ["--point", method, "--sizes", str(seq_len), "--window",
                           str(args.window), "--repeats", str(args.repeats)],
                {"method": method, "seq_len": seq_len}, args.timeout, args.memory_cap_gib)
            if "seconds" in row:
                useful = 3 * 4 * seq_len * (args.window + 1) * HEAD_DIM * HEADS
                row["gflops"] = useful / row["seconds"] / 1e9
                row["matmul_fraction"] = useful / row["seconds"] / matmul_rate
            rows.append(row)
            print(_describe(row), flush=True)
    print()
    print(markdown_table(rows, args.window))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"matmul_flops_per_second": matmul_rate, "rows": rows}, f, indent=1)


def _describe(row: dict) -> str:
    if "failed" in row:
        return f"{row['method']:>6} n={row['seq_len']:>6}: {row['failed']}"
    return (f"{row['method']:>6} n={row['seq_len']:>6}: {row['seconds'] * 1e3:9.1f} ms "
            f"{row['xla_bytes'] / 2**20:9.1f} MiB (rss +{row['rss_bytes'] / 2**20:.0f}) "
            f"{row['gflops']:6.1f} GFLOP/s "
            f"({row['matmul_fraction']:.0%} of matmul)")


def markdown_table(rows: list[dict], window: int) -> str:
    """The README table: per length, each method's time and memory, and our ratios."""
    by_key = {(r["method"], r["seq_len"]): r for r in rows}
    lines = ["| n | ours ms | ours MiB | ours % matmul | ours µs/token | seed ms | seed MiB "
             "| dense ms | dense MiB | seed/ours time | seed/ours memory |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for seq_len in sorted({r["seq_len"] for r in rows}):
        cells = [str(seq_len)]
        ours = by_key.get(("ours", seq_len), {})
        for method in METHODS:
            row = by_key.get((method, seq_len), {})
            if "failed" in row:
                cells += [row["failed"], "—"] + (["—", "—"] if method == "ours" else [])
            elif row:
                cells += [f"{row['seconds'] * 1e3:.0f}", f"{row['xla_bytes'] / 2**20:.0f}"]
                if method == "ours":
                    cells += [f"{row['matmul_fraction']:.0%}",
                              f"{row['seconds'] / seq_len * 1e6:.2f}"]
            else:
                cells += ["not run", "—"] + (["—", "—"] if method == "ours" else [])
        seed = by_key.get(("seed", seq_len), {})
        if "seconds" in ours and "seconds" in seed:
            cells += [f"{seed['seconds'] / ours['seconds']:.1f}×",
                      f"{seed['xla_bytes'] / ours['xla_bytes']:.1f}×"]
        else:
            cells += ["—", "—"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
