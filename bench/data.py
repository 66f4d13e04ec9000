"""Input pipeline speed: building the token cache at scale, the cached restart, and batches
against training.

    python bench/data.py [--corpus_mb 1024] [--large_mb 4096] [--repeats 1]
                         [--seq_len 16384] [--batch_size 8] [--batches 40] [--no-pipeline]

The build (``--corpus_mb``, 0: skipped): a corpus of text files generated from the standard
library's sources (documents between separator lines, 16 MB a file), its training split
tokenized into an empty cache with 1 worker and with 2, against HF ``datasets``'
``map(batched=True, num_proc=2)`` with the same tokenizer on the same documents (already in
Arrow, so its reading is not timed), with the bytes tokenizer and a SentencePiece model trained
on the stdlib, interleaved, the best of ``--repeats``; the parent's reading rate of a local
HF dataset (the ceiling of sources the parent reads, such as pg19's), and the projected wait
for pg19 (11 GB) on 16 cores. Then the peak memory (the build's processes together, sampled)
of building one ``--large_mb`` file of separated documents, each process capped at 1 GiB.

The pipeline (``--pipeline``): on the default (stdlib) corpus with document packing, the
first-run tokenization time (empty cache) and the restart time (cache hit), with a
SentencePiece model trained on the corpus and with the bytes tokenizer, then with bytes the
pipeline's rate in tokens/s (shuffled, packed, prefetched batches), and the training step's
consumption rate of the ~20M-parameter model of bench/model.py at the same context (its own
process), so that the ratio says whether the input can ever limit training.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import cli  # noqa: E402
from bench.common import cap_memory, measure_in_subprocess, resident_bytes  # noqa: E402
from configs.data import get_config  # noqa: E402
from data import ByteTokenizer, SentencePieceTokenizer, shards, sources  # noqa: E402
from data.token_cache import tokenized_split  # noqa: E402
from data.tokenizers import encode_document, train_sentencepiece  # noqa: E402

SEPARATOR = "<|end|>"
FILE_MB = 16  # a generated corpus file
PG19_BYTES = 11e9  # pg19's text, about
PROJECTED_CORES = 16


def _write_corpus(folder: str, megabytes: int, file_mb: int) -> int:
    """Text files of ``file_mb`` MB (the last one shorter) in ``folder``, ``megabytes`` MB in
    all: the stdlib's training documents, over and over, each followed by a separator line.
    Returns their bytes."""
    documents = [d.encode() + f"\n{SEPARATOR}\n".encode()
                 for d in sources.read_documents(get_config(), "train")]
    os.makedirs(folder, exist_ok=True)
    total, index = 0, 0
    while total < megabytes << 20:
        with open(os.path.join(folder, f"part{total // (file_mb << 20):05d}.txt"), "wb") as f:
            written = 0
            while written < file_mb << 20 and total + written < megabytes << 20:
                written += f.write(documents[index % len(documents)])
                index += 1
        total += written
    return total


def _text_config(paths: str, cache_dir: str):
    config = get_config()
    config.update(source="text", paths=paths, document_separator=SEPARATOR, cache_dir=cache_dir)
    return config


def _build_seconds(config, tokenizer, workers: int) -> float:
    """Seconds to build the training split's cache from empty with ``workers`` processes."""
    config.workers = workers
    shutil.rmtree(config.cache_dir, ignore_errors=True)
    start = time.perf_counter()
    tokenized_split(config, "train", tokenizer, config.cache_dir)
    seconds = time.perf_counter() - start
    shutil.rmtree(config.cache_dir)
    return seconds


def _map_seconds(dataset, tokenizer, folder: str) -> float:
    """Seconds of HF ``datasets``' ``map(batched=True, num_proc=2)`` of ``tokenizer`` (each
    document's ids and the end id, as the cache holds) over ``dataset`` (its "text" column)."""
    end = tokenizer.end_of_document_id

    def tokenize(batch):
        return {"ids": [np.append(encode_document(tokenizer, text), end) for text in batch["text"]]}

    start = time.perf_counter()
    dataset.map(tokenize, batched=True, num_proc=2, remove_columns=["text"],
                load_from_cache_file=False, cache_file_name=os.path.join(folder, "ids.arrow"))
    seconds = time.perf_counter() - start
    for name in os.listdir(folder):
        if name.startswith("ids"):
            os.remove(os.path.join(folder, name))
    return seconds


def _parent_read_rate(dataset) -> float:
    """Bytes/s at which a parent reads a local HF dataset and hands its shards to workers (the
    records as `sources.read_documents` yields them, cut and pickled as the build does): the
    ceiling of a build from a source that the parent reads."""
    size = 0
    start = time.perf_counter()
    for shard in shards.documents_in_shards(record["text"] for record in dataset):
        size += len(pickle.dumps(shard))
    return size / (time.perf_counter() - start)


def bench_build(corpus_mb: int, large_mb: int, repeats: int, sentencepiece: bool) -> None:
    import datasets

    folder = tempfile.mkdtemp(prefix="bench_data_")
    try:
        size = _write_corpus(os.path.join(folder, "corpus"), corpus_mb, FILE_MB)
        config = _text_config(os.path.join(folder, "corpus"), os.path.join(folder, "cache"))
        print(f"corpus: {size / 1e9:.2f} GB of stdlib documents between separator lines, "
              f"{FILE_MB} MB files; the training split (98% of documents) into an empty cache")
        tokenizers = {"bytes": ByteTokenizer()}
        if sentencepiece:  # as train.py trains one on the stdlib (default size)
            model = os.path.join(folder, "sentencepiece.model")
            train_sentencepiece(sources.read_documents(get_config(), "train"), model,
                                get_config().sentencepiece_vocab_size)
            tokenizers["sentencepiece"] = SentencePieceTokenizer(model)
        dataset = datasets.Dataset.from_generator(
            lambda: ({"text": d} for d in sources.read_documents(config, "train")),
            cache_dir=os.path.join(folder, "hf"))
        maps = os.path.join(folder, "maps")
        os.makedirs(maps)
        rates = {}
        for name, tokenizer in tokenizers.items():
            best = {"1 worker": 0.0, "2 workers": 0.0, "HF map, num_proc=2": 0.0}
            for _ in range(repeats):  # interleaved: the machine's speed drifts
                best["1 worker"] = max(best["1 worker"], size / _build_seconds(config, tokenizer, 1))
                best["2 workers"] = max(best["2 workers"], size / _build_seconds(config, tokenizer, 2))
                best["HF map, num_proc=2"] = max(best["HF map, num_proc=2"],
                                                 size / _map_seconds(dataset, tokenizer, maps))
            rates[name] = best
            print(f"{name}: " + ", ".join(f"{k} {v / 1e6:.1f} MB/s" for k, v in best.items())
                  + f"; 2 workers {best['2 workers'] / best['1 worker']:.2f}x 1 worker, "
                  f"{best['2 workers'] / best['HF map, num_proc=2']:.2f}x HF map")
        ceiling = _parent_read_rate(dataset)
        print(f"a source the parent reads (hf, tfds): {ceiling / 1e6:.0f} MB/s of documents "
              f"read and handed out by it")
        for name, best in rates.items():
            per_core = best["2 workers"] / 2
            hours = PG19_BYTES / min(PROJECTED_CORES * per_core, ceiling) / 3600
            print(f"pg19 ({PG19_BYTES / 1e9:.0f} GB), {name}: {per_core / 1e6:.1f} MB/s per core "
                  f"(2 workers' rate / 2) -> first-run wait {hours * 60:.0f} min on "
                  f"{PROJECTED_CORES} cores")
        del dataset
        shutil.rmtree(os.path.join(folder, "corpus"))
        shutil.rmtree(os.path.join(folder, "hf"))
        if large_mb:
            large = os.path.join(folder, "large")
            size = _write_corpus(large, large_mb, large_mb)
            row = measure_in_subprocess(__file__, ["--point", os.path.join(large, "part00000.txt"),
                                                   os.path.join(folder, "cache")],
                                        {"large_mb": large_mb}, timeout=3600, memory_cap_gib=1)
            if "failed" in row:
                print(f"one {size / 1e9:.1f} GB file: {row['failed']}")
            else:
                print(f"one {size / 1e9:.1f} GB file of separated documents, bytes, 2 workers: "
                      f"{size / row['seconds'] / 1e6:.1f} MB/s; peak memory "
                      f"{row['peak_bytes'] / 2**20:.0f} MiB (all its processes, sampled), "
                      f"{row['peak_parent_bytes'] / 2**20:.0f} MiB the parent; each capped at "
                      f"1 GiB")
        from metrics import matmul_flops_per_second  # JAX: after HF's forks

        print(f"matmul rate now (metrics.py, float32): "
              f"{matmul_flops_per_second() / 1e9:.0f} GFLOP/s")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _large_point(path: str, cache_dir: str) -> None:
    """Builds one file's training split with 2 workers; prints its seconds and peak memory."""
    import psutil

    peak = [0]
    done = threading.Event()

    def sample():
        me = psutil.Process()
        while not done.wait(0.05):
            total = 0
            for process in [me, *me.children(recursive=True)]:
                try:
                    total += process.memory_info().rss
                except psutil.NoSuchProcess:
                    pass
            peak[0] = max(peak[0], total)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    config = _text_config(path, cache_dir)
    seconds = _build_seconds(config, ByteTokenizer(), 2)
    done.set()
    sampler.join()
    # VmHWM, not ru_maxrss: Linux carries the peak of the process that started this one (its
    # vfork before the exec, here the bench's own ~1.4 GB) into ru_maxrss.
    print(json.dumps({"seconds": seconds, "peak_bytes": peak[0],
                      "peak_parent_bytes": resident_bytes("VmHWM")}))


def _tokenize_twice(config, tokenizer, seq_len):
    """Times the first run (empty cache) and the restart (cache hit) of the training split."""
    from data import packed_examples

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
                        help="also time a trained SentencePiece tokenizer")
    parser.add_argument("--corpus_mb", type=int, default=1024,
                        help="the generated corpus of the build's rates (0: no build rates)")
    parser.add_argument("--large_mb", type=int, default=4096,
                        help="the one file of the build's peak memory (0: not measured)")
    parser.add_argument("--repeats", type=int, default=1, help="the build's, best taken")
    parser.add_argument("--pipeline", action=argparse.BooleanOptionalAction, default=True,
                        help="the stdlib's first run and restart, and batches against training")
    parser.add_argument("--point", nargs=2, help=argparse.SUPPRESS)  # the large file's build
    parser.add_argument("--memory_cap_gib", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.point:
        cap_memory(args.memory_cap_gib)
        _large_point(*args.point)
        return
    for flag in ("seq_len", "batch_size", "batches", "repeats"):  # before the minutes of work
        if getattr(args, flag) < 1:
            parser.error(f"--{flag}={getattr(args, flag)}: expected an int >= 1")
    for flag in ("corpus_mb", "large_mb"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag}={getattr(args, flag)}: expected an int >= 0")
    if args.corpus_mb:
        bench_build(args.corpus_mb, args.large_mb, args.repeats, args.sentencepiece)
    if args.pipeline:
        bench_pipeline(args)


def bench_pipeline(args) -> None:
    """The stdlib's first run and restart, the pipeline's rate and the training step's."""
    from data import TrainBatches, make_tokenizer

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
