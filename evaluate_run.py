"""Evaluate a trained run: loss, perplexity and bits per byte over every token of a split.

    python evaluate_run.py --workdir=runs/default [--seq_len=8192] [--split=validation]
        [--max_tokens=N] [--output=eval.json] [--plot=loss_by_position.png]
        [--config.data.KEY=VALUE ...]

Restores the latest checkpoint (or ``--step``) with the config it was trained with; the
``--config.data.*``, ``--config.mesh.*`` and ``--config.batch_size`` flags change that config
(e.g. evaluate on other text). ``--seq_len`` may exceed the training context: each attention
layer sees only its window, so longer contexts cost linearly and should not hurt.
Prints and writes (``--output``) JSON with ``loss`` (nats/token), ``perplexity``,
``bits_per_byte`` (tokenizer-independent), ``num_tokens`` and ``loss_by_distance_band`` (tokens
with 0–W, W–L·W and more than L·W tokens of context, probes.py); ``--plot`` draws the loss
against the position in the context. ``--probe=passkey`` adds the retrieval probe (probes.py):
ranking accuracy, exact greedy copies and per-digit accuracy against the distance of a planted
key and by band (within W, W to L·W, beyond L·W), printed as tables, in the JSON (``passkey``,
``passkey_bands``) and drawn by ``--probe_plot``.

Named evaluate_run.py, not evaluate.py: a module ``evaluate`` at the repository root, which every
script and pytest run from here puts first on ``sys.path``, would shadow Hugging Face's
``evaluate`` package, which lm-evaluation-harness's tasks import (harness.py).
"""

from __future__ import annotations

import json
import sys

import jax
from absl import flags, logging
from ml_collections import config_flags

import cli
import inference
import launch
import plots
import probes
import sharding
from configs import default
from data import packed_examples
from errors import UserError
from model import TransformerLM

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The training run's workdir.", required=True)
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_enum("split", "validation", ["validation", "train"], "Which split to evaluate.")
flags.DEFINE_integer("seq_len", 0, "Context length (default: the training seq_len).")
flags.DEFINE_integer("max_tokens", 0, "Stop after about this many tokens (0: the whole split).")
flags.DEFINE_string("output", None, "Also write the results to this JSON file.")
flags.DEFINE_string("plot", None, "Write a PNG of loss against position in the context.")
flags.DEFINE_enum("probe", None, ["passkey"], "Also run this long-range probe (probes.py).")
flags.DEFINE_list("probe_distances", [], "Passkey distances in tokens (default: W/2, W, 2W, "
                  "L·W/2, L·W, 2·L·W, 4·L·W for window W, L layers).")
flags.DEFINE_integer("probe_trials", 16, "Passkey trials per distance.")
flags.DEFINE_string("probe_plot", None, "Write a PNG of passkey retrieval against distance.")

_OVERRIDABLE = ("data.", "mesh.", "batch_size")


def _check_overrides(overrides: dict) -> None:
    for key in overrides:
        if not key.startswith(_OVERRIDABLE):
            raise UserError(f"--config.{key}: evaluate_run.py takes only --config.data.*, "
                            f"--config.mesh.* and --config.batch_size")


def _check_lengths(seq_len: int, max_tokens: int) -> None:
    if seq_len < 0:
        raise UserError(f"--seq_len={seq_len}: expected a positive int (0: the training one)")
    if max_tokens < 0:
        raise UserError(f"--max_tokens={max_tokens}: expected 0 (the whole split) or more")


def evaluate(workdir: str, split: str = "validation", seq_len: int = 0, max_tokens: int = 0,
             overrides: dict | None = None, step: int | None = None) -> dict:
    """Evaluates the checkpoint of ``workdir`` (``step``; default the latest) with
    `evaluate_run`; ``overrides``: flat ``--config.*`` values (data.*, mesh.*, batch_size)."""
    _check_overrides(overrides or {})
    return evaluate_run(inference.load_for_inference(workdir, overrides, step), split, seq_len,
                        max_tokens)


def evaluate_run(run: inference.LoadedRun, split: str = "validation", seq_len: int = 0,
                 max_tokens: int = 0) -> dict:
    """`inference.evaluate_batches`' results over ``split`` cut into ``seq_len`` tokens
    (default: the training seq_len), plus ``seq_len``, ``step``, ``split`` and
    ``loss_by_distance_band`` (all plain Python or numpy values)."""
    _check_lengths(seq_len, max_tokens)
    config, model_cfg = run.config, run.model_config
    seq_len = seq_len or config.seq_len
    evaluator = inference.make_evaluator(config, TransformerLM(model_cfg), run.mesh,
                                         jax.tree.map(lambda x: x.sharding, run.params),
                                         run.tokenizer)
    sharding.check_length_fits_mesh(seq_len, run.mesh, model_cfg.layer_chunk_size,
                                    model_cfg.window_size)
    examples = packed_examples(config.data, split, run.tokenizer, seq_len)
    result = evaluator(run.params, examples, max_tokens=max_tokens)
    bands = probes.loss_by_distance_band(result["loss_by_position"], result["tokens_by_position"],
                                         model_cfg.window_size, model_cfg.num_layers)
    return result | {"seq_len": seq_len, "step": run.step, "split": split,
                     "loss_by_distance_band": bands}


def main(argv) -> None:
    del argv  # cli.parse_flags admits none
    logging.set_verbosity(logging.ERROR)  # orbax warns that a read-only manager is read-only
    for flag in ("output", "plot", "probe_plot"):  # before the work, not after it
        cli.check_output_file(flag, FLAGS[flag].value)
    for flag in ("plot", "probe_plot"):
        plots.check_plot_path(flag, FLAGS[flag].value)
    try:
        distances = [int(d) for d in FLAGS.probe_distances]
    except ValueError:
        raise UserError(f"--probe_distances={','.join(FLAGS.probe_distances)}: "
                        f"expected comma-separated ints") from None
    # The flags' own ranges, before the checkpoint is restored.
    if FLAGS.probe_plot and FLAGS.probe != "passkey":
        raise UserError(f"--probe_plot={FLAGS.probe_plot!r} needs --probe=passkey")
    if FLAGS.probe_trials < 1:
        raise UserError(f"--probe_trials={FLAGS.probe_trials}: expected an int >= 1")
    if any(d < 0 for d in distances):
        raise UserError(f"--probe_distances={','.join(FLAGS.probe_distances)}: expected "
                        f"distances >= 0")
    _check_lengths(FLAGS.seq_len, FLAGS.max_tokens)
    launch.start_distributed()
    overrides = config_flags.get_override_values(FLAGS["config"])
    _check_overrides(overrides)
    run = inference.load_for_inference(FLAGS.workdir, overrides, FLAGS.step)
    result = evaluate_run(run, FLAGS.split, FLAGS.seq_len, FLAGS.max_tokens)
    if FLAGS.plot and jax.process_index() == 0:
        plots.plot_loss_by_position(result, FLAGS.plot)
    summary = {k: result[k] for k in ("loss", "perplexity", "bits_per_byte", "num_tokens",
                                      "seq_len", "step", "split", "loss_by_distance_band")}
    if FLAGS.probe == "passkey":
        passkey = probes.passkey_probe(run, distances, FLAGS.probe_trials)
        summary["passkey"], summary["passkey_bands"] = passkey.rows, passkey.bands
    if jax.process_index() != 0:  # every process holds the same result; one reports it
        return
    if "passkey" in summary:
        print(probes.format_passkey_table(passkey), file=sys.stderr)
        if FLAGS.probe_plot:
            plots.plot_passkey({"this run": passkey.rows}, FLAGS.probe_plot, passkey.window,
                               passkey.reach, f"passkey, step {result['step']}")
    print(json.dumps(summary, indent=1))
    if FLAGS.output:
        with open(FLAGS.output, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    cli.define_config_dict(default.get_config(), "Overrides of the run's config: "
                           "--config.data.*, --config.mesh.*, --config.batch_size.",
                           whole="evaluate_run.py evaluates with the run's saved config; it takes "
                                 "only --config.data.*, --config.mesh.* and --config.batch_size")
    cli.run(main)
