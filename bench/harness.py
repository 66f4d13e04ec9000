"""harness.py against the path users have today: the same run exported to transformers and
scored by lm-eval's ``hf`` backend, on the same tasks, on this CPU.

    python bench/harness.py --workdir=runs/default [--output_dir=DIR] [--lengths=2048,8192,32768]
        [--documents=4] [--niah_length=4096] [--niah_limit=4] [--long_tokens=131072]
        [--repeats=2] [--memory_cap_gib=16] [--timeout=1800]

Exports the run (export.py's `hf.folder.write_model_folder`) and writes a perplexity task over
its first ``--documents`` validation documents (`harness.write_perplexity_task`). Then, each
in a fresh process under a memory cap (bench/common.py), interleaved, ``--repeats`` times:

- the perplexity task at ``--max_length`` of each of ``--lengths``: our adapter (`harness.RunLM`)
  and the ``hf`` backend (``HFLM``, float32, batch 1); the seconds of ``simple_evaluate`` (ours:
  its compilations included), the best repeat kept, and both scores (target: equal to 1e-3
  relative, ours at least 5x faster at 8192);
- ``niah_single_1`` at ``--niah_length`` tokens (``--niah_limit`` samples, RULER's text sized
  by the run's tokenizer for both), once each: the seconds (RULER's generation of its 500
  samples included) and the greedy answers (target: the same);
- ours alone on one document of ``--long_tokens`` tokens (the training split's documents
  joined) in one rolling window: seconds and the point's peak resident memory.

A point that runs out of memory or time is reported as failed, with why. Prints a JSON row per
point and a table at the end; ``--output_dir`` keeps the export, the tasks and rows.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # noqa: E402
from bench.common import cap_memory, measure_in_subprocess, peak_rss_bytes  # noqa: E402
from errors import UserError  # noqa: E402

PERPLEXITY_TASK, LONG_TASK = "bench_validation", "bench_long"
SCORES = ("bits_per_byte,none", "byte_perplexity,none", "word_perplexity,none")


def _point(args) -> dict:
    """One measurement, in this process: ``args.backend`` on ``args.task`` at
    ``args.max_length``."""
    import harness

    cap_memory(args.memory_cap_gib)
    niah = args.task == "niah_single_1"
    # Each backend indexes only the tasks' folder: lm-eval's 15,000 tasks take tens of seconds.
    include = (os.path.join(os.path.dirname(sys.modules["harness"].lm_eval.__file__), "tasks",
                            "ruler") if niah else os.path.join(args.output_dir, "tasks"))
    metadata = {"max_seq_lengths": [args.niah_length]} if niah else {}
    limit = args.niah_limit if niah else None
    if args.backend == "ours":
        import inference

        lm = harness.RunLM(inference.load_for_inference(args.workdir), args.max_length,
                           max(16384, args.max_length))
        start = time.perf_counter()
        results = harness.evaluate_tasks(lm, [args.task], include, limit, metadata)
    else:
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        folder = os.path.join(args.output_dir, "hf")
        lm = HFLM(pretrained=folder, max_length=args.max_length, batch_size=1, device="cpu",
                  dtype="float32")
        start = time.perf_counter()
        results = lm_eval.simple_evaluate(model=lm, tasks=[args.task], limit=limit,
                                          task_manager=harness.task_manager(
                                              [args.task], include,
                                              metadata | {"tokenizer": folder}))
    seconds = time.perf_counter() - start
    row = {"backend": args.backend, "task": args.task, "max_length": args.max_length,
           "seconds": round(seconds, 2), "peak_rss_gib": round(peak_rss_bytes() / 2**30, 2)}
    scores = results["results"][args.task]
    if niah:
        row["score"] = scores[f"{args.niah_length},none"]
        row["answers"] = [sample["resps"][0][0] for sample in results["samples"][args.task]]
    else:
        row |= {key.split(",")[0]: scores[key] for key in SCORES}
    return row


def _prepare(args) -> None:
    """The export, the perplexity tasks and the long document, in ``args.output_dir``."""
    import inference
    import harness
    from data import sources
    from hf.folder import write_model_folder

    run = inference.load_for_inference(args.workdir)
    folder = os.path.join(args.output_dir, "hf")
    if not os.path.exists(folder):
        write_model_folder(folder, run.params, run.model_config, run.tokenizer,
                           max_position_embeddings=max(args.lengths + [args.long_tokens]),
                           max_shard_bytes=2**32)
    tasks = os.path.join(args.output_dir, "tasks")
    os.makedirs(tasks, exist_ok=True)
    documents = list(sources.read_documents(run.config.data, "validation"))[:args.documents]
    harness.write_perplexity_task(tasks, PERPLEXITY_TASK, documents)
    long, count = [], 0
    for document in sources.read_documents(run.config.data, "train"):
        long.append(document)
        count += len(run.tokenizer.encode(document))
        if count >= args.long_tokens:
            break
    harness.write_perplexity_task(tasks, LONG_TASK, ["\n".join(long)])
    print(json.dumps({"documents": len(documents), "tokens": [
        len(run.tokenizer.encode(d)) for d in documents], "long_document_tokens": count}),
          flush=True)


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--output_dir", default=None)
    parser.add_argument("--lengths", type=cli.int_list, default=[2048, 8192, 32768])
    parser.add_argument("--documents", type=int, default=4)
    parser.add_argument("--niah_length", type=int, default=4096)
    parser.add_argument("--niah_limit", type=int, default=4)
    parser.add_argument("--long_tokens", type=int, default=131072)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--memory_cap_gib", type=float, default=16.0)
    parser.add_argument("--timeout", type=int, default=1800)
    # One measurement (the script re-runs itself for each).
    parser.add_argument("--point", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", choices=("ours", "hf"), help=argparse.SUPPRESS)
    parser.add_argument("--task", help=argparse.SUPPRESS)
    parser.add_argument("--max_length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for name in ("documents", "niah_length", "niah_limit", "long_tokens", "repeats"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name}={getattr(args, name)}: expected an int >= 1")
    if not args.lengths or min(args.lengths) < 2:
        raise UserError(f"--lengths={args.lengths}: expected lengths >= 2")
    if args.point:
        print(json.dumps(_point(args)), flush=True)
        return
    if not os.path.isdir(os.path.join(args.workdir, "checkpoints")):
        raise UserError(f"--workdir={args.workdir!r}: no checkpoints folder (a trained run)")
    args.output_dir = args.output_dir or tempfile.mkdtemp(prefix="bench_harness_")
    os.makedirs(args.output_dir, exist_ok=True)
    _prepare(args)

    def measure(backend: str, task: str, max_length: int) -> dict:
        label = {"backend": backend, "task": task, "max_length": max_length}
        point = ["--point", f"--backend={backend}", f"--task={task}",
                 f"--max_length={max_length}"] + [
            f"--{name}={getattr(args, name)}" for name in ("workdir", "output_dir",
                                                           "niah_length", "niah_limit")]
        row = measure_in_subprocess(os.path.abspath(__file__), point, label, args.timeout,
                                    args.memory_cap_gib)
        print(json.dumps(row), flush=True)
        with open(os.path.join(args.output_dir, "rows.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    rows = []
    for _ in range(args.repeats):  # interleaved: the machine's speed drifts
        for max_length in args.lengths:
            for backend in ("ours", "hf"):
                rows.append(measure(backend, PERPLEXITY_TASK, max_length))
    for backend in ("ours", "hf"):  # once: RULER's 500 samples dominate either time
        rows.append(measure(backend, "niah_single_1", args.niah_length + 128))
    rows.append(measure("ours", LONG_TASK, args.long_tokens))
    print(f"{'backend':8} {'task':18} {'max_length':>10} {'best s':>8} {'peak GiB':>8}  score")
    for key in dict.fromkeys((r["backend"], r["task"], r["max_length"]) for r in rows):
        same = [r for r in rows if (r["backend"], r["task"], r["max_length"]) == key]
        done = [r for r in same if "failed" not in r]
        if not done:
            print(f"{key[0]:8} {key[1]:18} {key[2]:>10} failed: {same[0]['failed']}")
            continue
        best = min(done, key=lambda r: r["seconds"])
        score = best.get("answers", best.get("byte_perplexity"))
        print(f"{key[0]:8} {key[1]:18} {key[2]:>10} {best['seconds']:>8.1f} "
              f"{best['peak_rss_gib']:>8.2f}  {score}")


if __name__ == "__main__":
    cli.run_plain(main)
