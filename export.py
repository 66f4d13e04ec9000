"""Export a trained run as a Hugging Face model folder.

    python export.py --workdir=runs/default --output=runs/default-hf [--step=N]
        [--max_shard_mb=5120]

Restores the latest checkpoint (or ``--step``) and writes config.json, safetensors and the
tokenizer files (hf/folder.py), which `transformers`' ``AutoModelForCausalLM`` and
``AutoTokenizer`` load: an all-local model as Mistral, one with global layers as Ministral.
What they cannot represent is a one-line error, before anything is written.
"""

from __future__ import annotations

from absl import flags, logging

import cli
import inference
from errors import UserError
from hf.folder import write_model_folder

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "The training run's workdir.", required=True)
flags.DEFINE_string("output", None, "The folder to write (must not exist).", required=True)
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_integer("max_shard_mb", 5120, "Largest safetensors file, MiB; larger models are "
                     "split into files with an index.")


def main(argv) -> None:
    del argv  # cli.parse_flags admits none
    logging.set_verbosity(logging.ERROR)  # orbax warns that a read-only manager is read-only
    if FLAGS.max_shard_mb < 1:
        raise UserError(f"--max_shard_mb={FLAGS.max_shard_mb}: expected a positive int")
    run = inference.load_for_inference(FLAGS.workdir, step=FLAGS.step)
    write_model_folder(FLAGS.output, run.params, run.model_config, run.tokenizer,
                       max_position_embeddings=run.config.seq_len,
                       max_shard_bytes=FLAGS.max_shard_mb * 2**20)
    print(f"wrote step {run.step} of {FLAGS.workdir} to {FLAGS.output}")


if __name__ == "__main__":
    cli.run(main)
