"""A Gemma-3-shaped model's training step against transformers' own model and a torch AdamW
step on the same CPU: the alternative a user has.

    python bench/gemma3.py [--contexts 2048,8192,32768] [--repeats 2] [--memory_cap_gib 20]

The model: Gemma 3 270M's layer shapes (d_model 640, MLP 2048 with gelu_pytorch_tanh gating, 4
query heads and 1 key/value head of 256, query_pre_attn_scalar 256, RoPE bases 10k local and
1M global, tied embeddings), 6 layers in the 5:1 pattern (5 sliding-window, then 1 global),
window 512, vocabulary cut to 32768. transformers writes it once (``Gemma3ForCausalLM`` with
random weights, ``save_pretrained``), and both sides read that folder:

- transformers: ``Gemma3ForCausalLM.from_pretrained`` in float32 with its default attention
  (which it reports), ``torch.optim.AdamW`` at its defaults, torch on every core; a step is
  the forward with labels (the loss), ``backward()``, ``optimizer.step()``, ``zero_grad()``.
- ours: the folder imported as ``init_from`` imports it (`hf.config.model_fields`,
  `hf.params.load_params`), with what a user sets for long contexts on a CPU (`OURS`:
  scanned, rematerialised layers; attention ``auto``); train.py's jitted step
  (`steps.setup_training`: AdamW with global-norm clipping, forward+backward+update), in a
  process with huge pages for malloc, as train.py runs (`launch.restart_with_huge_pages`).

Batch 1 × context, float32, the same random tokens on both sides, each of whose first step
reports its loss (the same model and targets give the same loss). Each point (side × context)
runs in its own process under a memory cap (bench/common.py). Seconds: the best of
``--repeats`` steps after a warm-up step (compilation excluded); tokens/s: context / seconds;
memory: the process's peak resident memory (VmHWM: imports, weights, compilation and steps),
the same measure for both sides, and for ours also what XLA's buffer assignment needs for the
step. A float32 matmul is timed before and after, since this machine's speed swings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # noqa: E402
from bench.common import (best_time, cap_memory, measure_in_subprocess, peak_bytes,  # noqa: E402
                          resident_bytes)

VOCAB_SIZE = 32768
# Gemma 3 270M's layer shapes, 6 layers in its 5:1 pattern, the vocabulary cut to 32k.
GEMMA3 = dict(vocab_size=VOCAB_SIZE, hidden_size=640, intermediate_size=2048,
              num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
              query_pre_attn_scalar=256, sliding_window=512,
              layer_types=["sliding_attention"] * 5 + ["full_attention"],
              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
                               "full_attention": {"rope_type": "default", "rope_theta": 1e6}},
              rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_activation="gelu_pytorch_tanh",
              use_cache=False)
# Our fields beyond the imported architecture: what a user sets for long contexts on a CPU
# (configs/long_context_cpu.py), the attention at the project's default.
OURS = dict(remat=True, scan_layers=True, attention_implementation="auto", dtype="float32")
SIDES = ("ours", "transformers")


def write_model(folder: str, max_context: int) -> None:
    """The random float32 Gemma-3-shaped model, written by transformers into ``folder``."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(**GEMMA3,
                                           max_position_embeddings=max(max_context, 32768))
    transformers.Gemma3ForCausalLM(config).save_pretrained(folder)


def _tokens(context: int):
    """The batch's ``(1, context + 1)`` tokens: inputs ``[:, :-1]``, targets ``[:, 1:]``."""
    import numpy as np

    return np.random.default_rng(0).integers(0, VOCAB_SIZE, (1, context + 1)).astype(np.int32)


def run_ours(folder: str, context: int, repeats: int) -> dict:
    import jax
    import numpy as np

    import sharding
    from configs import default
    from hf.config import model_fields, read_config_json
    from hf.params import load_params
    from model import TransformerConfig
    from steps import setup_training

    model_config = TransformerConfig.from_config(model_fields(read_config_json(folder)) | OURS)
    config = default.get_config()
    config.batch_size, config.seq_len = 1, context
    training = setup_training(config, model_config, jax.devices()[:1])
    state = training.init_state(load_params(folder, model_config, training.abstract_state.params))
    tokens = _tokens(context)
    batch = sharding.to_global_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                                      "loss_mask": np.ones((1, context), np.int32)},
                                     sharding.batch_sharding(training.mesh))
    compiled = training.train_step.lower(state, batch).compile()
    states, losses = [state], []

    def one_step():
        states[0], metrics = compiled(states[0], batch)
        losses.append(float(metrics["loss"]))  # waits for the step

    one_step()  # warm up
    seconds = best_time(one_step, repeats)
    return {"xla_bytes": peak_bytes(compiled), "seconds": seconds, "first_loss": losses[0]}


def run_transformers(folder: str, context: int, repeats: int) -> dict:
    import torch
    import transformers

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    model = transformers.Gemma3ForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters())
    tokens = torch.from_numpy(_tokens(context)).long()
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    losses = []

    def one_step():
        # shift_labels: the targets as given (labels alone would be shifted once more).
        try:
            loss = model(input_ids=inputs, labels=targets, shift_labels=targets).loss
            loss.backward()
            optimizer.step()
        except RuntimeError as error:  # torch's allocator under the cap: what common.py reads
            if "DefaultCPUAllocator" in str(error):
                raise MemoryError(str(error)) from error
            raise
        optimizer.zero_grad()
        losses.append(loss.item())

    one_step()  # warm up
    seconds = best_time(one_step, repeats)
    return {"attention": model.config._attn_implementation,
            "torch_threads": torch.get_num_threads(), "seconds": seconds,
            "first_loss": losses[0]}


def run_point(side: str, context: int, folder: str, repeats: int) -> dict:
    row = (run_ours if side == "ours" else run_transformers)(folder, context, repeats)
    return {"side": side, "context": context, **row, "tokens_per_second": context / row["seconds"],
            "peak_bytes": resident_bytes("VmHWM")}


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=cli.int_list, default="2048,8192,32768")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps after the warm-up")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per point")
    parser.add_argument("--memory_cap_gib", type=float, default=20.0)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--point", nargs=3, help=argparse.SUPPRESS)  # internal: SIDE CONTEXT FOLDER
    args = parser.parse_args()

    if args.point:
        side, context, folder = args.point
        if side == "ours":
            import launch

            launch.restart_with_huge_pages()
        cap_memory(args.memory_cap_gib)
        print(json.dumps(run_point(side, int(context), folder, args.repeats)))
        return

    from metrics import matmul_flops_per_second, matmul_size

    rates = [matmul_flops_per_second()]
    print(f"float32 matmul ({matmul_size()}²): {rates[0] / 1e9:.1f} GFLOP/s; "
          f"{len(os.sched_getaffinity(0))} cores; ours with {OURS}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_gemma3_") as folder:
        write_model(folder, max(args.contexts))
        for context in args.contexts:
            for side in SIDES:
                row = measure_in_subprocess(__file__, ["--point", side, str(context), folder,
                                                       "--repeats", str(args.repeats)],
                                            {"side": side, "context": context}, args.timeout,
                                            args.memory_cap_gib)
                rows.append(row)
                print(_describe(row), flush=True)
    rates.append(matmul_flops_per_second())
    print(f"float32 matmul after the points: {rates[1] / 1e9:.1f} GFLOP/s\n")
    print(markdown_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"matmul_flops_per_second": rates, "rows": rows}, f, indent=1)


def _describe(row: dict) -> str:
    name = f"{row['side']:>12} context {row['context']:>6}"
    if "failed" in row:
        return f"{name}: {row['failed']}"
    extra = (f", XLA's buffers {row['xla_bytes'] / 2**30:.2f} GiB" if "xla_bytes" in row
             else f", attention {row['attention']}, {row['torch_threads']} torch threads")
    return (f"{name}: {row['seconds']:8.2f} s {row['tokens_per_second']:7.1f} tokens/s, peak "
            f"{row['peak_bytes'] / 2**30:.2f} GiB{extra}, first loss {row['first_loss']:.5f}")


def markdown_table(rows: list[dict]) -> str:
    points = {(r["side"], r["context"]): r for r in rows}
    lines = ["| context | ours tokens/s | transformers tokens/s | speed ours/transformers "
             "| ours peak GiB (XLA's buffers) | transformers peak GiB "
             "| memory ours/transformers | first-step loss, ours / transformers |",
             "|---|---|---|---|---|---|---|---|"]
    for context in sorted({c for _, c in points}):
        ours, theirs = points[("ours", context)], points[("transformers", context)]
        both = "failed" not in ours and "failed" not in theirs
        cells = [f"{context}"]
        cells += [r.get("failed") or f"{r['tokens_per_second']:.0f}" for r in (ours, theirs)]
        cells.append(f"{theirs['seconds'] / ours['seconds']:.2f}×" if both else "—")
        cells.append("—" if "failed" in ours else
                     f"{ours['peak_bytes'] / 2**30:.2f} ({ours['xla_bytes'] / 2**30:.2f})")
        cells.append("—" if "failed" in theirs else f"{theirs['peak_bytes'] / 2**30:.2f}")
        cells.append(f"{ours['peak_bytes'] / theirs['peak_bytes']:.2f}×" if both else "—")
        cells.append(f"{ours['first_loss']:.5f} / {theirs['first_loss']:.5f}" if both else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    cli.run_plain(main)
