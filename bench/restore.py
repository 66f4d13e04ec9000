"""Time and host memory of loading a trained run's checkpoint for evaluation, on one CPU device.

    python bench/restore.py [--layers 8] [--d_model 1024] [--mlp_dim 4096] [--vocab 32000]

Saves a checkpoint of a model of about 170M float32 parameters with its AdamW state (the
moments: twice the parameters), as train.py does, then loads it in a fresh process per method,
as evaluate_run.py, generate.py and export.py do before their work, and reports the seconds and
what the load added to the process's peak resident memory (VmHWM, reset just before), as a
multiple of the parameters' bytes:

- ``parameters``: `checkpoints.Checkpoints.restore_params`, what they run: the parameters
  alone, verified by their checksums (target: at most 0.5x ``whole_state``'s time and memory);
- ``whole_state``: `checkpoints.Checkpoints.restore` of the whole `steps.TrainState`, moments
  included, then its ``.params``: what they ran before.
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
from bench.common import (measure_in_subprocess, reset_peak_resident,  # noqa: E402
                          resident_bytes)

METHODS = ("parameters", "whole_state")


def _config(args):
    """configs/default.py at the benchmark's size, bytes-tokenized, on one device."""
    from configs import default

    config = default.get_config()
    config.model.update(num_layers=args.layers, d_model=args.d_model, mlp_dim=args.mlp_dim,
                        num_heads=args.d_model // 128)
    config.mesh.data = 1
    return config


def _abstract_state(config, vocab: int):
    """The `steps.TrainState`'s shapes, dtypes and shardings, and its model config."""
    import run_config
    import sharding
    from model import TransformerLM
    from steps import create_train_state, make_optimizer

    class Vocabulary:  # the size is all the model takes from a tokenizer
        vocab_size = vocab

    model_config = run_config.model_config(config, Vocabulary())
    abstract, _ = create_train_state(config, TransformerLM(model_config), sharding.make_mesh(
        config), make_optimizer(config), abstract=True)
    return abstract


def write_run(args, workdir: str) -> int:
    """A checkpoint (step 1) of a random state as train.py saves it; returns the parameters'
    bytes."""
    import jax
    import numpy as np

    from checkpoints import Checkpoints
    from data.tokenizers import ByteTokenizer

    config = _config(args)
    abstract = _abstract_state(config, args.vocab)
    generator = np.random.default_rng(0)
    state = jax.tree.map(  # the step and PRNG key (integers) as zeros
        lambda a: jax.device_put((generator.standard_normal(a.shape) * 0.02).astype(a.dtype),
                                 a.sharding), abstract)
    checkpoints = Checkpoints(workdir)
    checkpoints.save(1, state, {"next_index": 0}, config, ByteTokenizer())
    checkpoints.wait()
    checkpoints.close()
    return sum(x.nbytes for x in jax.tree.leaves(state.params))


def measure_point(args) -> dict:
    import jax
    import numpy as np

    from checkpoints import Checkpoints

    abstract = _abstract_state(_config(args), args.vocab)
    jax.device_put(np.zeros(1)).block_until_ready()  # the runtime up before the baseline
    before = reset_peak_resident()
    start = time.perf_counter()
    checkpoints = Checkpoints(args.workdir, read_only=True)
    if args.point == "parameters":
        params = checkpoints.restore_params(abstract)
    else:
        params = checkpoints.restore(abstract).state.params
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    checkpoints.close()
    return {"method": args.point, "added_bytes": resident_bytes("VmHWM") - before,
            "seconds": seconds}


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--d_model", type=int, default=1024)
    parser.add_argument("--mlp_dim", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=2, help="Loads per method (best kept).")
    # A point's own flags (one process per method; see bench/common.py).
    parser.add_argument("--point", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--memory_cap_gib", type=float, default=16.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for flag in ("layers", "mlp_dim", "vocab", "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag}={getattr(args, flag)}: expected an int >= 1")
    if args.d_model < 128 or args.d_model % 128:
        parser.error(f"--d_model={args.d_model}: expected a multiple of 128 (heads of 128)")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.point:
        print(json.dumps(measure_point(args)))
        return
    with tempfile.TemporaryDirectory() as workdir:
        param_bytes = write_run(args, workdir)
        print(f"checkpoint: {param_bytes / 2**30:.3f} GiB of float32 parameters and twice that "
              f"in AdamW moments ({args.layers} layers, d_model {args.d_model}, mlp "
              f"{args.mlp_dim}, vocab {args.vocab}), one CPU device; best of {args.repeats}")
        print(f"{'method':<12} {'added peak':>12} {'x params':>9} {'seconds':>8}")
        size_args = [f"--layers={args.layers}", f"--d_model={args.d_model}",
                     f"--mlp_dim={args.mlp_dim}", f"--vocab={args.vocab}", f"--workdir={workdir}"]
        best = {}
        for _ in range(args.repeats):  # interleaved: the machine's speed drifts
            for method in METHODS:
                row = measure_in_subprocess(os.path.abspath(__file__),
                                            size_args + [f"--point={method}"], {"method": method},
                                            timeout=600, memory_cap_gib=args.memory_cap_gib)
                if "failed" in row:
                    print(f"{method:<12} {row['failed']}")
                    continue
                kept = best.setdefault(method, row)
                best[method] = {key: min(kept[key], row[key]) for key in ("added_bytes", "seconds")}
        for method, row in best.items():
            print(f"{method:<12} {row['added_bytes'] / 2**30:>9.3f} GiB "
                  f"{row['added_bytes'] / param_bytes:>8.2f}x {row['seconds']:>8.2f}")
        if len(best) == len(METHODS):
            ours, before = best["parameters"], best["whole_state"]
            print(f"parameters / whole_state: time {ours['seconds'] / before['seconds']:.2f}x, "
                  f"added peak memory {ours['added_bytes'] / before['added_bytes']:.2f}x "
                  f"(target: at most 0.5x each)")


if __name__ == "__main__":
    cli.run_plain(main)
