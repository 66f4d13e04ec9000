"""Peak training memory of the pg19 model against the context, by XLA's ahead-of-time analysis.

    python bench/memory.py [--contexts 65536,...,2097152] [--meshes data=1]

train.py's own step (`steps.setup_training`'s train step on its abstract state: AdamW, clipping,
forward+backward+update) for configs/pg19.py at batch 1 with the blocked ``xla`` attention and
a bytes vocabulary (384) and packed documents (segment ids and positions), lowered and compiled, never run: ``compiled.memory_analysis()`` gives
the peak for any context on a CPU (arguments + outputs − donated + temporaries). Each point is
its own process. Settings compared in one run: ``chunked`` (the preset: layers recomputed in
16k-token chunks), ``whole_layers`` (``model.layer_chunk_size=0``: each layer recomputed
over the whole sequence at once) and ``global_4`` (whole layers, one global layer in four,
which under context parallelism gathers every earlier block's keys and values; ``_kv4``: with
4 key/value heads instead of 16). With ``--meshes``, every mesh runs on as many simulated CPU
devices as it has, and the figures are per device.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # noqa: E402
from bench.common import cap_memory, measure_in_subprocess, peak_bytes  # noqa: E402
from errors import UserError  # noqa: E402

SETTINGS = {"chunked": {}, "whole_layers": {"layer_chunk_size": 0},
            # One global layer in four, whole layers (what context parallelism runs with).
            "global_4": {"layer_chunk_size": 0, "global_layers": 4},
            "global_4_kv4": {"layer_chunk_size": 0, "global_layers": 4, "num_kv_heads": 4}}
DEFAULT_CONTEXTS = "65536,131072,262144,524288,1048576,2097152"


def parse_meshes(text: str) -> list[dict]:
    """``"data=1;fsdp=2,tensor=2"`` -> ``[{"data": 1}, {"fsdp": 2, "tensor": 2}]`` (the other
    axes 1)."""
    from sharding import MESH_AXES

    meshes = []
    for mesh_text in filter(str.strip, text.split(";")):
        mesh = {}
        for part in filter(None, mesh_text.split(",")):
            axis, _, size = part.partition("=")
            if axis.strip() not in MESH_AXES or not size.strip().isdigit():
                raise UserError(f"argument --meshes: {part!r}: expected AXIS=SIZE with AXIS "
                                f"one of {list(MESH_AXES)}")
            mesh[axis.strip()] = int(size)
        meshes.append(mesh)
    return meshes


def run_point(setting: str, context: int, mesh: dict, vocab_size: int) -> dict:
    import jax
    import jax.numpy as jnp

    import sharding
    from configs import pg19
    from model import TransformerConfig
    from steps import setup_training

    config = pg19.get_config(str(context))
    config.batch_size = math.prod(mesh.get(axis, 1) for axis in sharding.BATCH_AXES)
    config.model.attention_implementation = "xla"
    for name, value in SETTINGS[setting].items():
        config.model[name] = value
    for axis in sharding.MESH_AXES:
        config.mesh[axis] = mesh.get(axis, 1)
    training = setup_training(config, TransformerConfig.from_config(config.model.to_dict(),
                                                                    vocab_size=vocab_size))
    batch = {name: jax.ShapeDtypeStruct((config.batch_size, context), jnp.int32,
                                        sharding=sharding.batch_sharding(training.mesh))
             for name in ("inputs", "targets", "loss_mask", "segment_ids", "positions")}
    state, step = training.abstract_state, training.train_step
    started = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    peak = peak_bytes(compiled)
    return {"setting": setting, "context": context, "mesh": mesh, "peak_bytes": peak,
            "bytes_per_token": peak / (context * config.batch_size / len(jax.devices())),
            "compile_seconds": time.perf_counter() - started}


def main() -> None:
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", type=cli.int_list, default=DEFAULT_CONTEXTS)
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--meshes", default="data=1",
                        help="';'-separated meshes, e.g. 'data=1;fsdp=2;data=2,tensor=2'")
    parser.add_argument("--vocab_size", type=int, default=384, help="384: the bytes tokenizer")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per point")
    parser.add_argument("--memory_cap_gib", type=float, default=16.0, help="per compilation")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--point", help=argparse.SUPPRESS)  # internal: JSON of one point
    args = parser.parse_args()

    if args.point:
        point = json.loads(args.point)
        devices = math.prod(point["mesh"].values())
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={devices}")
        cap_memory(args.memory_cap_gib)
        print(json.dumps(run_point(point["setting"], point["context"], point["mesh"],
                                   point["vocab_size"])))
        return

    settings = [s for s in args.settings.split(",") if s]
    for setting in settings:
        if setting not in SETTINGS:
            parser.error(f"argument --settings: {setting!r}: expected some of {list(SETTINGS)}")
    try:
        meshes = parse_meshes(args.meshes)
    except UserError as error:
        parser.error(str(error))
    rows = []
    for mesh in meshes:
        for context in args.contexts:
            for setting in settings:
                point = {"setting": setting, "context": context, "mesh": mesh,
                         "vocab_size": args.vocab_size}
                row = measure_in_subprocess(__file__, ["--point", json.dumps(point)], point,
                                            args.timeout, args.memory_cap_gib)
                rows.append(row)
                print(_describe(row), flush=True)
    print()
    print(markdown_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def _mesh_name(mesh: dict) -> str:
    return ",".join(f"{axis}={size}" for axis, size in mesh.items())


def _describe(row: dict) -> str:
    name = f"{row['setting']:>12} context {row['context']:>8} mesh {_mesh_name(row['mesh'])}"
    if "failed" in row:
        return f"{name}: {row['failed']}"
    return (f"{name}: {row['peak_bytes'] / 2**30:7.2f} GiB {row['bytes_per_token'] / 1024:6.1f} "
            f"KiB/token (compiled in {row['compile_seconds']:.0f} s)")


def markdown_table(rows: list[dict]) -> str:
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    header = "| mesh | context | " + " | ".join(f"{s} GiB | {s} KiB/token" for s in settings)
    lines = [header + " |", "|---|---|" + "---|---|" * len(settings)]
    by_key = {(_mesh_name(r["mesh"]), r["context"], r["setting"]): r for r in rows}
    for mesh, context in dict.fromkeys((_mesh_name(r["mesh"]), r["context"]) for r in rows):
        cells = [mesh, f"{context:,}"]
        for setting in settings:
            row = by_key.get((mesh, context, setting), {"failed": "not run"})
            if "failed" in row:
                cells += [row["failed"], "—"]
            else:
                cells += [f"{row['peak_bytes'] / 2**30:.1f}", f"{row['bytes_per_token'] / 1024:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    cli.run_plain(main)
