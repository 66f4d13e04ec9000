"""Which config learns most in a fixed wall-clock budget on this machine: the sweep behind
``configs/default.py``.

    python bench/sweep.py [--budget_seconds=150] [--points=NAME,...] [--out=runs/sweep]

Each point of `GRID` (the fields it sets: tokenizer, model size, context, batch,
learning rate, schedule) runs as ``python train.py`` would:

1. a probe: a few steps, for the seconds per step of the point on this machine;
2. the run: as many steps as fit ``--budget_seconds`` of training (the schedule's length, so
   every run decays fully), evaluating about 6 times on 8 validation batches;
3. ``evaluate_run.py`` on the whole validation split: the bits per byte of the table.

Setup (SentencePiece training, tokenization, compilation) is reported apart from the budget.
It prints a markdown table (docs/benchmarks.md's) and writes ``<out>/sweep.json`` and
``<out>/sweep.png`` (validation bits per byte against training seconds, one line per point).
Points run one at a time: a point's speed is the whole machine's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # noqa: E402
from bench.common import REPO_ROOT  # noqa: E402

# Every point sets all the fields the sweep varies, so a point means the same run whatever
# configs/default.py holds; the table shows where a point differs from configs/default.py.
_BYTES = {"data.tokenizer": "bytes", "seq_len": 2048, "batch_size": 2, "learning_rate": 3e-3,
          "decay_schedule": "cosine", "min_learning_rate_ratio": 0.1, "model.num_layers": 4,
          "model.d_model": 256, "model.num_heads": 4, "model.mlp_dim": 768}
_SP8192 = _BYTES | {"data.tokenizer": "sentencepiece", "data.sentencepiece_vocab_size": 8192,
                    "seq_len": 1024, "batch_size": 4}  # the same tokens per step
_LINEAR = {"decay_schedule": "linear", "min_learning_rate_ratio": 0.0}

# name -> config fields
GRID = {
    "bytes (the old default)": _BYTES,
    "bytes lr 6e-3": _BYTES | {"learning_rate": 6e-3},
    "sp2048": _SP8192 | {"data.sentencepiece_vocab_size": 2048},
    "sp4096": _SP8192 | {"data.sentencepiece_vocab_size": 4096},
    "sp8192": _SP8192,
    # Around the best tokenizer of the points above:
    "sp8192 lr 6e-3": _SP8192 | {"learning_rate": 6e-3},
    "sp8192 d384": _SP8192 | {"model.d_model": 384, "model.num_heads": 6, "model.mlp_dim": 1152},
    "sp8192 6 layers": _SP8192 | {"model.num_layers": 6},
    "sp8192 batch 8": _SP8192 | {"batch_size": 8},
    "sp8192 ctx2048": _SP8192 | {"seq_len": 2048, "batch_size": 2},
    "sp8192 linear to 0": _SP8192 | _LINEAR,
}

_PROBE_STEPS = 8
_EVALUATIONS = 6


def _flags(fields: dict) -> list[str]:
    return [f"--config.{key}={value}" for key, value in fields.items()]


def _run(command: list[str]) -> float:
    """Runs a script of this repository; returns its wall seconds. A failure raises with its
    output."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *command], cwd=REPO_ROOT, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{(done.stderr + done.stdout)[-3000:]}")
    return time.perf_counter() - started


def _metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def seconds_per_step(name: str, fields: dict, out: str) -> tuple[float, float]:
    """The probe: ``(seconds per training step after compilation, the probe's wall seconds)``."""
    workdir = os.path.join(out, name, "probe")
    shutil.rmtree(workdir, ignore_errors=True)
    wall = _run(["train.py", f"--workdir={workdir}", *_flags(fields | {
        "num_train_steps": _PROBE_STEPS, "warmup_steps": 1, "log_every_steps": 1,
        "eval_every_steps": 0, "eval_batches": 1, "checkpoint_every_steps": _PROBE_STEPS,
        "sample_tokens": 0})])
    steps = [r["seconds_per_step"] for r in _metrics(workdir)
             if "seconds_per_step" in r and 2 < r["step"] < _PROBE_STEPS]
    return sorted(steps)[len(steps) // 2], wall


def run_point(name: str, fields: dict, budget_seconds: float, out: str) -> dict:
    step_seconds, probe_wall = seconds_per_step(name, fields, out)
    steps = max(20, int(budget_seconds / step_seconds))
    workdir = os.path.join(out, name, "run")
    shutil.rmtree(workdir, ignore_errors=True)
    every = max(1, steps // _EVALUATIONS)
    run_fields = fields | {
        "num_train_steps": steps, "warmup_steps": min(30, steps // 10),
        "eval_every_steps": every, "eval_batches": 8, "checkpoint_every_steps": steps,
        "log_every_steps": 5, "sample_tokens": 0}
    train_wall = _run(["train.py", f"--workdir={workdir}", *_flags(run_fields)])
    rows = _metrics(workdir)
    # Training seconds at each logged step: the logged windows' seconds per step (evaluation
    # left out) added up, the first window's (compilation) at the median step's rate.
    windows = [r["seconds_per_step"] for r in rows if "seconds_per_step" in r]
    median = sorted(windows[1:])[len(windows[1:]) // 2]
    elapsed, last_step, curve = 0.0, 0, []
    for row in rows:
        if "seconds_per_step" in row:
            rate = median if last_step == 0 else row["seconds_per_step"]
            elapsed += rate * (row["step"] - last_step)
            last_step = row["step"]
        if "eval/bits_per_byte" in row:
            curve.append((row["step"], elapsed, row["eval/bits_per_byte"]))
    training_seconds = elapsed
    result_path = os.path.join(workdir, "evaluation.json")
    _run(["evaluate_run.py", f"--workdir={workdir}", f"--output={result_path}"])
    with open(result_path) as f:
        final = json.load(f)
    return {"name": name, "fields": fields, "steps": steps,
            "tokens": steps * fields["batch_size"] * fields["seq_len"],
            "seconds_per_step": step_seconds, "training_seconds": training_seconds,
            "train_py_wall_seconds": train_wall, "probe_wall_seconds": probe_wall,
            "bits_per_byte": final["bits_per_byte"], "curve": curve}


def _default(key: str):
    """configs/default.py's value of a dotted field (``model.d_model``)."""
    from configs import default

    part, _, name = key.rpartition(".")
    config = default.get_config()
    return (config[part] if part else config)[name]


def _differences(fields: dict) -> dict:
    """The fields whose values differ from configs/default.py's."""
    return {key: value for key, value in fields.items() if _default(key) != value}


def _short(key: str) -> str:
    """A config key as the table shows it: ``data.sentencepiece_vocab_size`` -> ``vocab``."""
    return {"data.sentencepiece_vocab_size": "vocab", "data.tokenizer": "tokenizer",
            "min_learning_rate_ratio": "min_lr_ratio"}.get(key, key.rpartition(".")[2])


def table(results: list[dict]) -> str:
    lines = ["| point | differences from configs/default.py | steps | tokens | s/step | "
             "training s | train.py wall s | validation bits/byte |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: r["bits_per_byte"]):
        changes = ", ".join(f"{_short(k)}={v}" for k, v in _differences(r["fields"]).items()) \
            or "(the default)"
        lines.append(f"| {r['name']} | {changes} | {r['steps']} | {r['tokens']:,} | "
                     f"{r['seconds_per_step']:.3f} | {r['training_seconds']:.0f} | "
                     f"{r['train_py_wall_seconds']:.0f} | **{r['bits_per_byte']:.3f}** |")
    return "\n".join(lines)


def plot(results: list[dict], path: str, budget_seconds: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for r in sorted(results, key=lambda r: r["bits_per_byte"]):
        _, seconds, bits = zip(*r["curve"]) if r["curve"] else ((), (), ())
        axes.plot(seconds, bits, marker="o", label=f"{r['name']} ({r['bits_per_byte']:.3f})")
    axes.set_xlabel("training seconds")
    axes.set_ylabel("validation bits per byte (8 batches)")
    axes.set_title(f"{budget_seconds:.0f} s of training per point; whole-split result in the "
                   f"legend")
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv) -> None:
    del argv
    names = FLAGS.points or list(GRID)
    unknown = [n for n in names if n not in GRID]
    if unknown:
        cli.exit_with_error(f"--points: unknown {unknown}; the grid has {list(GRID)}")
    os.makedirs(FLAGS.out, exist_ok=True)
    results_path = os.path.join(FLAGS.out, "sweep.json")
    # Points already measured with this budget are kept: the sweep can be run in parts.
    results = []
    if os.path.exists(results_path):
        with open(results_path) as f:
            results = [r for r in json.load(f) if r.get("budget_seconds") == FLAGS.budget_seconds
                       and r["name"] not in names]
    for name in names:
        result = run_point(name, GRID[name], FLAGS.budget_seconds, FLAGS.out)
        result["budget_seconds"] = FLAGS.budget_seconds
        results.append(result)
        print(f"{name}: {result['bits_per_byte']:.3f} bits/byte after {result['steps']} steps "
              f"({result['training_seconds']:.0f} s of training)", flush=True)
        with open(results_path, "w") as f:
            json.dump(results, f, indent=1)
    print(table(results))
    plot(results, os.path.join(FLAGS.out, "sweep.png"), FLAGS.budget_seconds)
    print(f"wrote {results_path} and {os.path.join(FLAGS.out, 'sweep.png')}")


if __name__ == "__main__":
    from absl import flags

    FLAGS = flags.FLAGS
    flags.DEFINE_float("budget_seconds", 150.0, "Training seconds per point.", lower_bound=1)
    flags.DEFINE_list("points", [], f"Points of the grid (default: all of {list(GRID)}).")
    flags.DEFINE_string("out", "runs/sweep", "Where the runs, sweep.json and sweep.png go.")
    cli.run(main)
