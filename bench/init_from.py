"""Host memory and time of ``init_from`` a Hugging Face folder of about 1 GB on one CPU device.

    python bench/init_from.py [--layers 12] [--d_model 1024] [--mlp_dim 4096] [--vocab 32000]

Writes a random Mistral-shaped float32 model (export.py's writer, one safetensors file), then
loads it in a fresh process per method and reports what the load added to the process's peak
resident memory (VmHWM, reset just before; file pages that a read maps count too), as a
multiple of the file's size, and its seconds:

- ``tensor_by_tensor``: `hf.params.load_params`, what ``init_from`` runs: each parameter read,
  converted and placed on its device before the next (target: at most 1.25x);
- ``all_then_device``: the naive way, for comparison: every tensor read (safetensors'
  ``load_file``) and converted, then all copied to the device (about 2x).
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

METHODS = ("tensor_by_tensor", "all_then_device")


def _model_config(args):
    from model import TransformerConfig

    return TransformerConfig(vocab_size=args.vocab, num_layers=args.layers, d_model=args.d_model,
                             num_heads=args.d_model // 128, num_kv_heads=max(1, args.d_model // 512),
                             mlp_dim=args.mlp_dim, window_size=4095, tie_embeddings=False,
                             scale_embeddings=False, norm_eps=1e-5)


def _abstract_params(config):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from model import TransformerLM

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shapes = jax.eval_shape(lambda: nn.unbox(TransformerLM(config).init(
        jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"]))
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)


def write_folder(args, folder: str) -> int:
    """A random model as a Hugging Face folder; returns its safetensors' size in bytes."""
    import jax
    import numpy as np

    from data.tokenizers import ByteTokenizer
    from hf.folder import write_model_folder

    config = _model_config(args)
    generator = np.random.default_rng(0)
    params = jax.tree.map(lambda s: generator.standard_normal(s.shape, np.float32) * 0.02,
                          _abstract_params(config))
    write_model_folder(folder, params, config, ByteTokenizer(), max_position_embeddings=4096)
    return os.path.getsize(os.path.join(folder, "model.safetensors"))


def measure_point(args) -> dict:
    import jax
    import numpy as np
    from safetensors.numpy import load_file

    from hf.params import _our_leaves, load_params

    config = _model_config(args)
    abstract = _abstract_params(config)
    jax.device_put(np.zeros(1)).block_until_ready()  # the runtime up before the baseline
    before = reset_peak_resident()
    start = time.perf_counter()
    if args.point == "tensor_by_tensor":
        params = load_params(args.folder, config, abstract)
    else:
        tensors = load_file(os.path.join(args.folder, "model.safetensors"))
        host = {path: convert(tensors.__getitem__, names)
                for path, (names, convert, _) in _our_leaves(config).items()}
        del tensors
        params = jax.tree_util.tree_map_with_path(
            lambda path, a: jax.device_put(host[tuple(k.key for k in path)], a.sharding), abstract)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - start
    return {"method": args.point, "added_bytes": resident_bytes("VmHWM") - before,
            "seconds": seconds}


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d_model", type=int, default=1024)
    parser.add_argument("--mlp_dim", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    # A point's own flags (one process per method; see bench/common.py).
    parser.add_argument("--point", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--memory_cap_gib", type=float, default=16.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.point:
        print(json.dumps(measure_point(args)))
        return
    with tempfile.TemporaryDirectory() as temporary:
        folder = os.path.join(temporary, "model")
        file_bytes = write_folder(args, folder)
        print(f"model.safetensors: {file_bytes / 2**30:.3f} GiB ({args.layers} layers, d_model "
              f"{args.d_model}, mlp {args.mlp_dim}, vocab {args.vocab}), one CPU device")
        print(f"{'method':<18} {'added peak':>12} {'x file':>8} {'seconds':>8}")
        size_args = [f"--layers={args.layers}", f"--d_model={args.d_model}",
                     f"--mlp_dim={args.mlp_dim}", f"--vocab={args.vocab}", f"--folder={folder}"]
        for method in METHODS:
            row = measure_in_subprocess(os.path.abspath(__file__),
                                        size_args + [f"--point={method}"], {"method": method},
                                        timeout=600, memory_cap_gib=args.memory_cap_gib)
            if "failed" in row:
                print(f"{method:<18} {row['failed']}")
                continue
            print(f"{method:<18} {row['added_bytes'] / 2**30:>9.3f} GiB "
                  f"{row['added_bytes'] / file_bytes:>7.2f}x {row['seconds']:>8.2f}")


if __name__ == "__main__":
    cli.run_plain(main)
