"""Training-step throughput and memory of the ~20M-parameter LM, local against dense attention,
and generation speed with the rolling caches.

    python bench/model.py [--contexts 1024,4096,16384,65536] [--generate 1024,16384]

Training: batch 1 × context, float32, rematerialised blocks, train.py's step (AdamW with
clipping, forward+backward+update in one jitted step); the same model with dense causal attention (``jax.nn.dot_product_attention``,
``is_causal``) is measured in the same run. Generation: a 16-token prompt, then N sampled
tokens in one jitted ``while_loop``. Each point runs in its own process under a memory cap;
memory is what XLA's buffer assignment needs for the step. The FLOP rate uses
`model.training_flops_per_token` and is compared with a float32 matmul timed in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # noqa: E402
from bench.common import best_time, cap_memory, measure_in_subprocess, xla_bytes  # noqa: E402

# ~20M parameters: 8 × (4·384² + 3·384·1536) + 384·384. Scanned, rematerialised layers keep
# activation memory at one block (unrolled layers under remat keep far more on XLA:CPU).
MODEL = dict(vocab_size=384, num_layers=8, d_model=384, num_heads=6, mlp_dim=1536,
             window_size=256, remat=True, scan_layers=True)


def _config(attention: str, context: int):
    from model import TransformerConfig

    if attention == "local":
        return TransformerConfig.from_config(MODEL)
    if attention == "global":  # one global layer in four (layers 3 and 7)
        return TransformerConfig.from_config(MODEL, global_layers=4)
    # Dense: a window covering the whole context is plain causal attention.
    return TransformerConfig.from_config(MODEL, window_size=context,
                                         attention_implementation="dense")


def run_train_point(attention: str, context: int, memory_cap: int) -> dict:
    import jax
    import jax.numpy as jnp

    import sharding
    from configs import default
    from model import count_parameters, training_flops_per_token
    from steps import setup_training

    model_config = _config(attention, context)
    # train.py's step on one device: AdamW with clipping, as `python train.py` runs it.
    config = default.get_config()
    config.batch_size, config.seq_len = 1, context
    training = setup_training(config, model_config, jax.devices()[:1])
    state = training.init_state()
    tokens = jax.random.randint(jax.random.key(1), (1, context + 1), 0, model_config.vocab_size)
    batch = sharding.to_global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                                      "loss_mask": jnp.ones((1, context), jnp.int32)},
                                     sharding.batch_sharding(training.mesh))
    step = training.train_step
    compiled = step.lower(state, batch).compile()
    row = {"kind": "train", "attention": attention, "context": context,
           "parameters": count_parameters(state.params), "xla_bytes": xla_bytes(compiled)}
    if row["xla_bytes"] > memory_cap:
        return row | {"failed": f"out of memory (needs {row['xla_bytes'] / 2**30:.0f} GiB)"}
    states = [state]

    def one_step():
        states[0], metrics = compiled(states[0], batch)
        jax.block_until_ready(metrics)

    one_step()  # warm up
    seconds = best_time(one_step, repeats=3 if context <= 4096 else 1)
    return row | {"seconds": seconds, "tokens_per_second": context / seconds,
                  "flops_per_second": training_flops_per_token(model_config, context) * context
                  / seconds}


def run_generate_point(new_tokens: int) -> dict:
    import jax

    from model import TransformerLM, generate

    config = _config("local", new_tokens)
    params = jax.jit(TransformerLM(config).init)(
        jax.random.key(0), jax.numpy.zeros((1, 8), jax.numpy.int32))["params"]
    prompt = jax.random.randint(jax.random.key(1), (1, 16), 0, config.vocab_size)
    kwargs = dict(config=config, max_new_tokens=new_tokens, temperature=1.0)
    compiled = generate.lower(params, prompt, jax.random.key(2), **kwargs).compile()
    seconds = best_time(lambda: jax.block_until_ready(compiled(params, prompt, jax.random.key(2))),
                        repeats=1)
    return {"kind": "generate", "new_tokens": new_tokens, "seconds": seconds,
            "tokens_per_second": new_tokens / seconds}


def decode_cache_bytes(num_kv_heads: int, decode_length: int = 16384) -> int:
    """Bytes of the decode caches (the ``cache`` collection) of the bench model with
    ``num_kv_heads`` key/value heads, one global layer in four, batch 1."""
    import jax

    from model import TransformerConfig, TransformerLM

    config = TransformerConfig.from_config(MODEL, num_kv_heads=num_kv_heads, global_layers=4,
                                           scan_layers=False)
    decoder = TransformerLM(config, decode=True, decode_length=decode_length)
    cache = jax.eval_shape(decoder.init, jax.random.key(0),
                           jax.numpy.zeros((1, 1), jax.numpy.int32))["cache"]
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=cli.int_list, default="1024,4096,16384,65536")
    parser.add_argument("--attentions", default="local,dense",
                        help="local, dense, global (one global layer in four)")
    parser.add_argument("--generate", type=cli.int_list, default="1024,16384",
                        help="generated lengths")
    parser.add_argument("--cache", action="store_true",
                        help="also print the decode cache bytes against num_kv_heads")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per point")
    parser.add_argument("--memory_cap_gib", type=float, default=20.0)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--point", nargs=2, help=argparse.SUPPRESS)  # internal: KIND ARG
    args = parser.parse_args()

    if args.point:
        cap = cap_memory(args.memory_cap_gib)
        kind, value = args.point
        if kind == "generate":
            row = run_generate_point(int(value))
        else:
            row = run_train_point(kind, int(value), cap)
        print(json.dumps(row))
        return

    if args.cache:
        full = decode_cache_bytes(MODEL["num_heads"])
        for kv_heads in (6, 3, 2, 1):
            size = decode_cache_bytes(kv_heads)
            print(f"decode cache, {kv_heads} key/value heads (6 query heads), one global layer in "
                  f"four, 16384 positions: {size / 2**20:.2f} MiB ({full / size:.2f}x smaller)")
    from metrics import matmul_flops_per_second, matmul_size

    matmul_rate = matmul_flops_per_second()
    print(f"float32 matmul ({matmul_size()}²): {matmul_rate / 1e9:.1f} GFLOP/s; model {MODEL}")
    rows = []

    def measure(point, label):
        row = measure_in_subprocess(__file__, ["--point", *point], label, args.timeout,
                                    args.memory_cap_gib)
        rows.append(row)
        print(_describe(row, matmul_rate), flush=True)

    for context in args.contexts:
        for attention in args.attentions.split(","):
            measure([attention, str(context)],
                    {"kind": "train", "attention": attention, "context": context})
    for new_tokens in args.generate:
        measure(["generate", str(new_tokens)], {"kind": "generate", "new_tokens": new_tokens})
    print()
    print(markdown_tables(rows, matmul_rate))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"matmul_flops_per_second": matmul_rate, "rows": rows}, f, indent=1)


def _describe(row: dict, matmul_rate: float) -> str:
    if row["kind"] == "generate":
        name = f"generate {row['new_tokens']:>6} tokens"
    else:
        name = f"train {row['attention']:>5} context {row['context']:>6}"
    if "failed" in row:
        return f"{name}: {row['failed']}"
    text = f"{name}: {row['seconds']:8.2f} s {row['tokens_per_second']:9.1f} tokens/s"
    if row["kind"] == "train":
        text += (f" {row['xla_bytes'] / 2**20:8.0f} MiB "
                 f"{row['flops_per_second'] / matmul_rate:.0%} of matmul")
    return text


def markdown_tables(rows: list[dict], matmul_rate: float) -> str:
    train = {(r["attention"], r["context"]): r for r in rows if r["kind"] == "train"}
    lines = ["| context | local tokens/s | local MiB | local % matmul | dense tokens/s | dense MiB "
             "| local/dense speed |", "|---|---|---|---|---|---|---|"]
    for context in sorted({c for _, c in train}):
        local, dense = train.get(("local", context), {}), train.get(("dense", context), {})
        cells = [str(context)]
        for row, with_rate in ((local, True), (dense, False)):
            if "failed" in row or not row:
                cells += [row.get("failed", "not run"), "—"] + (["—"] if with_rate else [])
            else:
                cells += [f"{row['tokens_per_second']:.0f}", f"{row['xla_bytes'] / 2**20:.0f}"]
                if with_rate:
                    cells.append(f"{row['flops_per_second'] / matmul_rate:.0%}")
        ratio = ("—" if "seconds" not in local or "seconds" not in dense
                 else f"{dense['seconds'] / local['seconds']:.1f}×")
        lines.append("| " + " | ".join(cells + [ratio]) + " |")
    generation = [r for r in rows if r["kind"] == "generate"]
    if generation:
        lines += ["", "| generated tokens | tokens/s |", "|---|---|"]
        lines += [f"| {r['new_tokens']} | "
                  + (r["failed"] if "failed" in r else f"{r['tokens_per_second']:.0f}") + " |"
                  for r in generation]
    return "\n".join(lines)


if __name__ == "__main__":
    cli.run_plain(main)
