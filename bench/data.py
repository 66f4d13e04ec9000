"""Input pipeline speed: tokenization, the cached restart, and batches against training.

    python bench/data.py [--seq_len 16384] [--batch_size 8] [--batches 40]

On the default (stdlib) corpus with document packing it measures, in one run: the first-run
tokenization time (empty cache) and the restart time (cache hit), with a SentencePiece model
trained on the corpus and with the bytes tokenizer, then with bytes the
pipeline's rate in tokens/s (shuffled, packed, prefetched batches), and the training step's
consumption rate of the ~20M-parameter model of bench/model.py at the same context (its own
process), so that the ratio says whether the input can ever limit training.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # noqa: E402
from bench.common import measure_in_subprocess  # noqa: E402
from configs.data import get_config  # noqa: E402
from data import TrainBatches, make_tokenizer, packed_examples  # noqa: E402


def _tokenize_twice(config, tokenizer, seq_len):
    """Times the first run (empty cache) and the restart (cache hit) of the training split."""
    start = time.perf_counter()
    packed_examples(config, "train", tokenizer, seq_len)
    first_run = time.perf_counter() - start
    start = time.perf_counter()
    examples = packed_examples(config, "train", tokenizer, seq_len)
    restart = time.perf_counter() - start
    print(f"{config.tokenizer}: {examples.tokens.size / 1e6:.1f}M tokens; first-run tokenization "
          f"{first_run:.2f} s, cached restart {restart:.3f} s ({first_run / restart:.0f}× faster)")
    return examples


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq_len", type=int, default=16384)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--sentencepiece", action=argparse.BooleanOptionalAction, default=True,
                        help="also time a trained SentencePiece tokenizer's first run and restart")
    args = parser.parse_args()
    for flag in ("seq_len", "batch_size", "batches"):  # before the minutes of work below
        if getattr(args, flag) < 1:
            parser.error(f"--{flag}={getattr(args, flag)}: expected an int >= 1")

    config = get_config()
    with tempfile.TemporaryDirectory() as cache_dir:
        config.cache_dir = cache_dir
        if args.sentencepiece:
            config.tokenizer = "sentencepiece"
            start = time.perf_counter()
            make_tokenizer(config, workdir=cache_dir)  # trained once, outside the timings
            print(f"sentencepiece ({config.sentencepiece_vocab_size} pieces) trained on the "
                  f"stdlib corpus in {time.perf_counter() - start:.0f} s")
            _tokenize_twice(config, make_tokenizer(config, workdir=cache_dir), args.seq_len)
            config.tokenizer = "bytes"
        examples = _tokenize_twice(config, make_tokenizer(config), args.seq_len)

        batches = TrainBatches(examples, args.batch_size, seed=0, prefetch=config.prefetch)
        next(batches)  # start the prefetch threads
        start = time.perf_counter()
        for _ in range(args.batches):
            next(batches)
        pipeline_rate = args.batches * args.batch_size * args.seq_len / (time.perf_counter() - start)
    print(f"pipeline: {pipeline_rate / 1e6:.1f}M tokens/s (batch {args.batch_size} × "
          f"{args.seq_len}, shuffled, packed with segment ids, prefetched)")

    train = measure_in_subprocess(os.path.join(os.path.dirname(__file__), "model.py"),
                                  ["--point", "local", str(args.seq_len)],
                                  {"context": args.seq_len}, timeout=1200, memory_cap_gib=20)
    if "failed" in train:
        print(f"training step at context {args.seq_len}: {train['failed']}")
        return
    print(f"training step (bench/model.py model, context {args.seq_len}): "
          f"{train['tokens_per_second']:.0f} tokens/s; the pipeline is "
          f"{pipeline_rate / train['tokens_per_second']:.0f}× faster")


if __name__ == "__main__":
    cli.run_plain(main)
