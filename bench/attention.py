"""Forward+backward time and peak memory of local attention: ours against the alternatives.

    python bench/attention.py [--sizes 1024,4096,16384,65536] [--window 256]
        [--heads 4] [--head_dims 64] [--dtype float32] [--documents 0,8192] [--methods ...]

Causal (window_size_right = 0), batch 1; by default 4 heads, head_dim 64, float32 (on a GPU:
16 heads, head_dims 64 and 128, bfloat16, with and without 8k-token documents). Compared, each
point in a process of its own so that its peak memory is its own:

* ``auto``: `model.local_attention` as called by default (the fastest exact kernel for the
  backend: ``xla`` on CPUs, ``cudnn`` on NVIDIA GPUs, ``splash`` on TPUs);
* ``xla``, ``cudnn``, ``splash``: our implementations by name (``--documents`` gives them
  segment ids of documents of that many tokens);
* ``seed``: the per-query ``vmap`` algorithm of the original ``local_attention_flax``
  (re-implemented here: each query gathers its window of keys, O(n·w·d) memory);
* ``dense``: ``jax.nn.dot_product_attention(local_window_size=...)``, which masks a full
  (n, n) score matrix;
* ``causal_cudnn``: full causal attention on cuDNN (``jax.nn``), the reference rate of a
  kernel without a window (its useful FLOPs count every causal pair).

A point whose step needs more memory than ``--memory_cap_gib`` (by XLA's own buffer
assignment, known before it runs), or which runs out of memory or time, is reported as such.

Useful FLOPs are 3.5 × 4 · head_dim · heads · (visible query-key pairs) for forward+backward
(FlashAttention's convention); their rate is compared with a large float32 matmul timed in the
same run on a CPU, and printed in TFLOP/s on an accelerator.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # noqa: E402
from bench.common import (best_time, cap_memory, measure_in_subprocess,  # noqa: E402
                          peak_rss_bytes, xla_bytes)
from errors import UserError  # noqa: E402

CPU_METHODS = ("auto", "xla", "seed", "dense")
GPU_METHODS = ("auto", "xla", "cudnn", "dense", "causal_cudnn")
MAX_DOCUMENTS = 64  # max_segments for cudnn: the documents a row may hold


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


def _attention_fn(method: str, window: int, segment_ids):
    import jax
    import jax.numpy as jnp

    from model import local_attention

    if method == "seed":
        if segment_ids is not None:
            raise UserError("seed: no document support")
        return lambda q, k, v: _seed_local_attention(q, k, v, window, 0)
    swap = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731  (batch, seq, heads, dim) layout
    if method == "causal_cudnn":
        return lambda q, k, v: swap(jax.nn.dot_product_attention(
            swap(q), swap(k), swap(v), is_causal=True, implementation="cudnn"))
    if method == "dense" and segment_ids is None:
        return lambda q, k, v: swap(jax.nn.dot_product_attention(
            swap(q), swap(k), swap(v), local_window_size=(window, 0)))
    return lambda q, k, v: local_attention(
        q, k, v, window_size_left=window, window_size_right=0, segment_ids=segment_ids,
        implementation=method, max_segments=MAX_DOCUMENTS)


def _document_ids(seq_len: int, document: int):
    """``(1, 1, seq_len)`` ids of documents of ``document`` tokens (None for 0: one stream)."""
    import jax.numpy as jnp

    return None if not document else (jnp.arange(seq_len) // document)[None, None]


def visible_pairs(seq_len: int, window: int, document: int, causal_only: bool = False) -> int:
    """Query-key pairs a causal window (or, with ``causal_only``, full causal attention)
    lets through, within documents of ``document`` tokens (0: one document)."""
    def pairs(n):
        if causal_only:
            return n * (n + 1) // 2
        full = min(n, window + 1)  # queries from `full` on see window + 1 keys
        return full * (full + 1) // 2 + (n - full) * (window + 1)

    if not document:
        return pairs(seq_len)
    whole, rest = divmod(seq_len, document)
    return whole * pairs(document) + pairs(rest)


def run_point(method: str, seq_len: int, window: int, heads: int, head_dim: int, dtype: str,
              document: int, repeats: int, memory_cap: int) -> dict:
    """Times one forward+backward in this process; returns a result row.

    Memory is reported twice: ``xla_bytes``, what XLA's buffer assignment needs for the step
    (arguments, outputs and temporaries: what an accelerator would have to hold), and
    ``rss_bytes``, how far the process's peak resident memory grew while the step ran.
    """
    import jax

    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(key, (1, heads, seq_len, head_dim), dtype) for key in keys)
    try:
        attention = _attention_fn(method, window, _document_ids(seq_len, document))
        step = jax.jit(jax.grad(lambda q, k, v: attention(q, k, v).astype("float32").sum(),
                                argnums=(0, 1, 2)))
        compiled = step.lower(q, k, v).compile()
    except UserError as error:  # a method that cannot compute this point (one line)
        return {"failed": f"unsupported: {str(error).splitlines()[0][:120]}"}
    row = {"xla_bytes": xla_bytes(compiled)}
    if row["xla_bytes"] > memory_cap and jax.default_backend() == "cpu":
        return row | {"failed": f"out of memory (needs {row['xla_bytes'] / 2**30:.0f} GiB)"}
    jax.block_until_ready((q, k, v))
    baseline = peak_rss_bytes()
    jax.block_until_ready(compiled(q, k, v))  # warm up
    seconds = best_time(lambda: jax.block_until_ready(compiled(q, k, v)), repeats)
    return row | {"seconds": seconds, "rss_bytes": peak_rss_bytes() - baseline}


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=cli.int_list, default="1024,4096,16384,65536")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--heads", type=int, default=None, help="default 4; 16 on a GPU")
    parser.add_argument("--head_dims", type=cli.int_list, default=None,
                        help="default 64; 64,128 on a GPU")
    parser.add_argument("--dtype", default=None, help="default float32; bfloat16 on a GPU")
    parser.add_argument("--documents", type=cli.int_list, default=None,
                        help="document lengths (0: one stream); default 0; 0,8192 on a GPU")
    parser.add_argument("--methods", default=None,
                        help=f"default {','.join(CPU_METHODS)}; on a GPU {','.join(GPU_METHODS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=600, help="seconds per point")
    parser.add_argument("--memory_cap_gib", type=float, default=20.0,
                        help="address space allowed to one point's process (CPU)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--point", help=argparse.SUPPRESS)  # internal: run one point
    args = parser.parse_args()
    sizes = args.sizes

    if args.point:
        cap = cap_memory(args.memory_cap_gib) if args.memory_cap_gib else 0
        print(json.dumps(run_point(args.point, sizes[0], args.window, args.heads,
                                   args.head_dims[0], args.dtype, args.documents[0],
                                   args.repeats, cap)))
        return

    import jax

    accelerator = jax.default_backend() != "cpu"
    heads = args.heads or (16 if accelerator else 4)
    head_dims = args.head_dims or ([64, 128] if accelerator else [64])
    dtype = args.dtype or ("bfloat16" if accelerator else "float32")
    documents = args.documents or ([0, 8192] if accelerator else [0])
    methods = (args.methods or ",".join(GPU_METHODS if accelerator else CPU_METHODS)).split(",")
    unknown = sorted(set(methods) - set(CPU_METHODS) - set(GPU_METHODS))
    if unknown:
        parser.error(f"argument --methods: {unknown[0]!r}: expected some of "
                     f"{sorted(set(CPU_METHODS) | set(GPU_METHODS))}")
    from metrics import matmul_flops_per_second, matmul_size

    matmul_rate = matmul_flops_per_second()
    print(f"{jax.devices()[0].device_kind}: float32 matmul ({matmul_size()}²) {matmul_rate / 1e12:.3f} "
          f"TFLOP/s; window {args.window}, {heads} heads, {dtype}, causal, forward+backward")
    rows = []
    for head_dim in head_dims:
        for seq_len in sizes:
            for document in documents:
                for method in methods:
                    label = {"method": method, "seq_len": seq_len, "head_dim": head_dim,
                             "documents": document}
                    row = label | measure_in_subprocess(
                        __file__, ["--point", method, "--sizes", str(seq_len), "--window",
                                   str(args.window), "--heads", str(heads), "--head_dims",
                                   str(head_dim), "--dtype", dtype, "--documents", str(document),
                                   "--repeats", str(args.repeats)],
                        label, args.timeout, 0 if accelerator else args.memory_cap_gib)
                    if "seconds" in row:
                        pairs = visible_pairs(seq_len, args.window, document,
                                              causal_only=method == "causal_cudnn")
                        useful = 3.5 * 4 * head_dim * heads * pairs
                        row["tflops"] = useful / row["seconds"] / 1e12
                        row["matmul_fraction"] = useful / row["seconds"] / matmul_rate
                    rows.append(row)
                    print(_describe(row), flush=True)
    print()
    print(markdown_table(rows, methods))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "heads": heads, "dtype": dtype,
                       "window": args.window, "matmul_flops_per_second": matmul_rate,
                       "rows": rows}, f, indent=1)


def _describe(row: dict) -> str:
    point = (f"{row['method']:>12} n={row['seq_len']:>6} d={row['head_dim']:>3} "
             f"documents={row['documents'] or '-':>5}")
    if "failed" in row:
        return f"{point}: {row['failed']}"
    return (f"{point}: {row['seconds'] * 1e3:9.2f} ms {row['xla_bytes'] / 2**20:9.1f} MiB "
            f"(rss +{row['rss_bytes'] / 2**20:.0f}) {row['tflops'] * 1e3:9.1f} GFLOP/s "
            f"({row['matmul_fraction']:.0%} of the float32 matmul)")


def markdown_table(rows: list[dict], methods: list[str]) -> str:
    """One line per (head_dim, n, documents): each method's ms, GFLOP/s and MiB, then each
    method's time against ``xla`` (our portable kernel) measured in the same run."""
    by_key = {(r["method"], r["head_dim"], r["seq_len"], r["documents"]): r for r in rows}
    header = ["head_dim", "n", "documents"] + [f"{m} ms / GFLOP/s / MiB" for m in methods]
    header += [f"xla/{m} time" for m in methods if m != "xla"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for head_dim, seq_len, document in sorted({k[1:] for k in by_key}):
        cells = [str(head_dim), str(seq_len), str(document or "—")]
        for method in methods:
            row = by_key.get((method, head_dim, seq_len, document), {})
            cells.append(row.get("failed", "not run") if "seconds" not in row else
                         f"{row['seconds'] * 1e3:.1f} / {row['tflops'] * 1e3:.0f} / "
                         f"{row['xla_bytes'] / 2**20:.0f}")
        xla = by_key.get(("xla", head_dim, seq_len, document), {})
        for method in methods:
            if method == "xla":
                continue
            row = by_key.get((method, head_dim, seq_len, document), {})
            cells.append(f"{xla['seconds'] / row['seconds']:.2f}×"
                         if "seconds" in row and "seconds" in xla else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    cli.run_plain(main)
