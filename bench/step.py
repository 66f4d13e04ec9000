"""Where a small model's training step goes on the CPU: the jitted step alone and train.py's
whole loop, with and without huge pages for XLA's temporaries.

    python bench/step.py [--steps=300] [--config.KEY=VALUE ...]

The shape is that of a small model whose step on this CPU was slower than PyTorch eager's
(docs/benchmarks.md): 4 layers, d_model 128, context 64, batch 12, UTF-8 bytes (the default
config's other fields: 4 heads, SwiGLU of 768, window 256, float32, AdamW with clipping). Each point
runs in its own process, once with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=0`` (glibc maps
XLA's temporaries in 4 KiB pages, faulted in afresh each step) and once with ``=1`` (what
`launch.restart_with_huge_pages` gives train.py, evaluate_run.py and generate.py):

* the jitted step alone: train.py's step (``steps.setup_training``) on a fixed batch, the median of
  ``--steps`` calls, with the page faults and system time per step;
* train.py's loop: ``python train.py`` for ``--steps`` steps on the stdlib corpus without
  periodic evaluation or saves; tokens/s is the median of its logged windows after the first.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import logging  # noqa: E402

import cli  # noqa: E402
from bench.common import REPO_ROOT  # noqa: E402

SHAPE = {"model.num_layers": 4, "model.d_model": 128, "seq_len": 64, "batch_size": 12,
         "data.tokenizer": "bytes"}
HUGE_PAGES = {"off": "glibc.malloc.hugetlb=0", "on": "glibc.malloc.hugetlb=1"}
_LOG_EVERY = 25


def _overrides(steps: int, extra: list[str]) -> list[str]:
    fields = SHAPE | {"num_train_steps": steps, "warmup_steps": 10, "eval_every_steps": 0,
                      "eval_batches": 1, "checkpoint_every_steps": steps,
                      "log_every_steps": _LOG_EVERY, "sample_tokens": 0}
    return [f"--config.{key}={value}" for key, value in fields.items()] + extra


def _environment(huge_pages: str) -> dict:
    return dict(os.environ, GLIBC_TUNABLES=HUGE_PAGES[huge_pages],
                PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]))


def measure_step_alone(config, steps: int) -> dict:
    """In this process: train.py's jitted step on one fixed batch of the configured shape."""
    import jax
    import numpy as np

    import run_config
    import sharding
    from data import make_tokenizer
    from steps import setup_training

    tokenizer = make_tokenizer(config.data, tempfile.mkdtemp(prefix="bench_step_"))
    training = setup_training(config, run_config.model_config(config, tokenizer))
    state, step = training.init_state(), training.train_step
    rows, length = config.batch_size, config.seq_len
    tokens = np.random.default_rng(0).integers(0, 256, (rows, length + 1)).astype(np.int32)
    batch = sharding.to_global_batch({
        "inputs": tokens[:, :-1], "targets": tokens[:, 1:],
        "loss_mask": np.ones((rows, length), np.float32),
        "segment_ids": np.ones((rows, length), np.int32),
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length)).copy(),
    }, sharding.batch_sharding(training.mesh))
    for _ in range(3):  # compile and warm up
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
    seconds = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(steps):
        started = time.perf_counter()
        state, metrics = step(state, batch)
        jax.block_until_ready(metrics)
        seconds.append(time.perf_counter() - started)
    after = resource.getrusage(resource.RUSAGE_SELF)
    median = float(np.median(seconds))
    return {"step_seconds": median, "tokens_per_second": rows * length / median,
            "page_faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
            "system_seconds_per_step": (after.ru_stime - before.ru_stime) / steps}


def measure_train_loop(huge_pages: str, steps: int, extra: list[str]) -> dict:
    """``python train.py`` in a fresh workdir; the median tokens/s of its logged windows."""
    workdir = tempfile.mkdtemp(prefix="bench_step_train_")
    command = [sys.executable, os.path.join(REPO_ROOT, "train.py"), f"--workdir={workdir}",
               *_overrides(steps, extra)]
    done = subprocess.run(command, capture_output=True, text=True, env=_environment(huge_pages))
    if done.returncode != 0:
        raise RuntimeError(f"train.py failed:\n{(done.stderr + done.stdout)[-3000:]}")
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    # After the first window (compilation) and before the last (the final save).
    rates = [r["tokens_per_second"] for r in rows if _LOG_EVERY < r["step"] < steps]
    return {"tokens_per_second": sorted(rates)[len(rates) // 2]}


def main(argv) -> None:
    del argv
    logging.set_verbosity(logging.WARNING)
    extra = [arg for arg in sys.argv[1:] if arg.startswith("--config.")]
    if FLAGS.point:
        print(json.dumps(measure_step_alone(FLAGS.config, FLAGS.steps)))
        return
    import jax

    results = {}
    shape = [f"--config.{key}={value}" for key, value in SHAPE.items()]
    for huge_pages in HUGE_PAGES:
        command = [sys.executable, os.path.abspath(__file__), "--point", f"--steps={FLAGS.steps}",
                   *shape, *extra]
        done = subprocess.run(command, capture_output=True, text=True,
                              env=_environment(huge_pages))
        if done.returncode != 0:
            raise RuntimeError(f"the step point failed:\n{(done.stderr + done.stdout)[-3000:]}")
        alone = json.loads(done.stdout.strip().splitlines()[-1])
        loop = measure_train_loop(huge_pages, FLAGS.steps, extra)
        results[huge_pages] = {"step_alone": alone, "train_loop": loop}
        print(f"huge pages {huge_pages:3s}: jitted step {alone['step_seconds'] * 1e3:6.1f} ms "
              f"({alone['tokens_per_second']:,.0f} tokens/s, "
              f"{alone['page_faults_per_step']:,.0f} page faults and "
              f"{alone['system_seconds_per_step'] * 1e3:.1f} ms of system time per step); "
              f"train.py's loop {loop['tokens_per_second']:,.0f} tokens/s", flush=True)
    gain = (results["on"]["train_loop"]["tokens_per_second"]
            / results["off"]["train_loop"]["tokens_per_second"])
    print(f"{jax.devices()[0].device_kind}, {len(os.sched_getaffinity(0))} cores, shape {SHAPE}: huge pages "
          f"make train.py's loop {gain:.2f}x as fast")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    from absl import flags

    FLAGS = flags.FLAGS
    cli.define_config_file(cli.DEFAULT_CONFIG, "Training config (with the shape above).")
    flags.DEFINE_integer("steps", 300, "Steps timed per point.", lower_bound=2 * _LOG_EVERY + 1)
    flags.DEFINE_bool("point", False, "Internal: measure the jitted step in this process.")
    flags.DEFINE_string("json", None, "Also write the figures to this file.")
    cli.run(main)
