"""Sample text from a trained run.

    python generate.py --workdir=runs/default [--step=N] [--prompt="def "] [--max_new_tokens=256]
        [--temperature=0.8] [--top_k=0] [--top_p=0.95] [--num_samples=1] [--seed=0]

Restores the latest checkpoint (or ``--step``), prefills the prompt and samples with the
rolling attention caches (model/sampling.py); stops a sample at the end-of-document token.
"""

from __future__ import annotations

import math

import jax
from absl import flags, logging

import cli
import inference
import launch
from errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The training run's workdir.", required=True)
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_string("prompt", None, "Text to continue (default: the config's sample_prompt).")
flags.DEFINE_integer("max_new_tokens", 256, "Tokens to sample per sample.")
flags.DEFINE_float("temperature", 0.8, "0 is greedy.")
flags.DEFINE_integer("top_k", 0, "Sample among the k likeliest tokens (0: all).")
flags.DEFINE_float("top_p", 0.95, "Nucleus sampling threshold (1: off).")
flags.DEFINE_integer("num_samples", 1, "Independent samples.")
flags.DEFINE_integer("seed", 0, "PRNG seed: the same seed gives the same samples.")


def main(argv) -> None:
    del argv  # cli.parse_flags admits none
    logging.set_verbosity(logging.ERROR)  # orbax warns that a read-only manager is read-only
    for flag in ("max_new_tokens", "num_samples"):
        if FLAGS[flag].value < 1:
            raise UserError(f"--{flag}={FLAGS[flag].value}: expected an int >= 1")
    if FLAGS.top_k < 0:
        raise UserError(f"--top_k={FLAGS.top_k}: expected an int >= 0 (0: all tokens)")
    if not 0 <= FLAGS.seed < 2**31:
        raise UserError(f"--seed={FLAGS.seed}: expected an int in [0, 2**31)")
    if not (math.isfinite(FLAGS.temperature) and FLAGS.temperature >= 0):
        raise UserError(f"--temperature={FLAGS.temperature}: expected a finite number >= 0 "
                        f"(0: greedy)")
    if not 0 < FLAGS.top_p <= 1:  # NaN too
        raise UserError(f"--top_p={FLAGS.top_p}: expected a probability in (0, 1] (1: off)")
    if FLAGS.max_new_tokens >= 2**30:
        raise UserError(f"--max_new_tokens={FLAGS.max_new_tokens}: expected fewer than 2**30")
    launch.start_distributed()
    run = inference.load_for_inference(FLAGS.workdir, step=FLAGS.step)
    prompt = run.config.sample_prompt if FLAGS.prompt is None else FLAGS.prompt
    for sample in range(FLAGS.num_samples):
        text = inference.sample_text(run.params, run.model_config, run.tokenizer, prompt,
                                     FLAGS.max_new_tokens, seed=FLAGS.seed + sample,
                                     temperature=FLAGS.temperature, top_k=FLAGS.top_k,
                                     top_p=FLAGS.top_p)
        if jax.process_index() == 0:  # every process samples the same text
            print(f"--- sample {sample + 1} of {FLAGS.num_samples} (step {run.step}) ---\n"
                  f"{text}")


if __name__ == "__main__":
    cli.run(main)
