"""Training-loop overhead and the cost of a checkpoint save, from one run of train.py.

    python bench/train.py [--config=configs/default.py] [--steps=60] [--save_every=20]
        [--config.KEY=VALUE ...] [--json=FILE]

Runs ``train_and_evaluate`` for ``--steps`` steps, logging every step, saving every
``--save_every``, without periodic evaluation, then reads metrics.jsonl:

* overhead: the share of wall time spent outside the jitted step (fetching the batch and
  putting it on the devices, logging, checkpoint calls), on steps without a save and overall;
* the save spike: a save step's time against the median step. Saves are asynchronous, so the
  spike is the copy off the devices plus orbax's bookkeeping; the same state saved
  synchronously (save, then wait for the files) is timed after the run for comparison.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # noqa: E402


def main(argv) -> None:
    del argv
    import jax
    import numpy as np
    from absl import logging

    import run_config
    import train
    from checkpoints import Checkpoints
    from data import make_tokenizer
    from steps import setup_training

    logging.set_verbosity(logging.WARNING)
    config = FLAGS.config
    config.num_train_steps = FLAGS.steps
    config.warmup_steps = min(config.warmup_steps, FLAGS.steps - 1)
    config.checkpoint_every_steps = FLAGS.save_every
    config.log_every_steps = 1
    config.eval_every_steps = 0
    config.eval_batches = 1
    config.sample_tokens = 0
    workdir = tempfile.mkdtemp(prefix="bench_train_")
    train.train_and_evaluate(config, workdir)  # a bad --config.* value: one line (cli.run)

    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    rows = [r for r in rows if "seconds_per_step" in r and r["step"] > 2]  # after compilation
    saves = [r for r in rows if "checkpoint_save_seconds" in r]
    plain = [r for r in rows if "checkpoint_save_seconds" not in r]
    median = float(np.median([r["seconds_per_step"] for r in plain]))

    def overhead(rs):
        total = sum(r["seconds_per_step"] for r in rs)
        return sum(r["overhead_fraction"] * r["seconds_per_step"] for r in rs) / total

    # The same state, saved synchronously: what the asynchronous save keeps off the loop.
    checkpoints = Checkpoints(workdir, read_only=True)
    tokenizer = make_tokenizer(config.data, workdir)
    training = setup_training(config, run_config.model_config(config, tokenizer))
    restored = checkpoints.restore(training.abstract_state)
    synchronous = Checkpoints(tempfile.mkdtemp(prefix="bench_save_"))
    started = time.perf_counter()
    synchronous.save(restored.step, restored.state, restored.data_state, config, tokenizer)
    synchronous.wait()
    sync_seconds = time.perf_counter() - started
    synchronous.close()

    figures = {
        "device": jax.devices()[0].device_kind,
        "config": FLAGS['config'].config_filename,
        "median_step_seconds": median,
        "tokens_per_second": config.batch_size * config.seq_len / median,
        "mfu": float(np.median([r["mfu"] for r in plain])),
        "overhead_fraction_without_saves": overhead(plain),
        "overhead_fraction_overall": overhead(rows),
        "save_step_seconds": [r["seconds_per_step"] for r in saves],
        "save_call_seconds": [r["checkpoint_save_seconds"] for r in saves],
        "synchronous_save_seconds": sync_seconds,
    }
    spike = max(figures["save_step_seconds"]) - median
    print(f"device {figures['device']}, {FLAGS['config'].config_filename}, {len(rows)} steps "
          f"measured; run in {workdir}")
    print(f"median step: {median:.3f} s ({figures['tokens_per_second']:,.0f} tokens/s, "
          f"MFU {figures['mfu']:.1%})")
    print(f"time outside the jitted step: {figures['overhead_fraction_without_saves']:.2%} of "
          f"wall time on steps without a save, {figures['overhead_fraction_overall']:.2%} overall")
    print(f"save steps: {', '.join(f'{s:.3f}' for s in figures['save_step_seconds'])} s "
          f"(largest spike +{spike:.3f} s = {spike / median:.1%} of a step); the asynchronous "
          f"save call blocked {max(figures['save_call_seconds']):.3f} s, a synchronous save of "
          f"the same state takes {sync_seconds:.3f} s")
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(figures, f, indent=1)


if __name__ == "__main__":
    from absl import flags

    FLAGS = flags.FLAGS
    cli.define_config_file(cli.DEFAULT_CONFIG, "Training config.")
    flags.DEFINE_integer("steps", 60, "Steps to run (the first two, compiling, are not timed).",
                         lower_bound=4)
    flags.DEFINE_integer("save_every", 20, "Steps between checkpoint saves.", lower_bound=1)
    flags.DEFINE_string("json", None, "Also write the figures to this file.")
    cli.run(main)
