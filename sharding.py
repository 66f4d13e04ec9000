"""The device mesh and how arrays are laid out on it.

The mesh has four axes, ``(data, fsdp, context, tensor)`` (``config.mesh``). A batch's rows are
split over data × fsdp and each row's positions over context (model/context_parallel.py);
parameters are sharded as their logical axis names (model/transformer.py) map to mesh axes
through ``config.logical_axis_rules``, in the manner of MaxText and Flax's
``nn.logical_axis_rules``. Each process feeds only the rows its devices hold
(`process_rows`), as global arrays (`to_global_batch`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import flax.linen as nn
import jax
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from errors import UserError
from model.kernels.common import lowering_platform
from model.layer_stack import check_device_chunks

MESH_AXES = ("data", "fsdp", "context", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over these mesh axes
LENGTH_AXIS = "context"  # and the sequence over this one (model/context_parallel.py)


def axis_rules(config: ml_collections.ConfigDict) -> tuple:
    """``config.logical_axis_rules`` as Flax wants them (tuples; JSON round trips give lists).

    Raises a one-line `UserError` for a rule that is not a (logical name, mesh axes) pair or
    names an axis outside `MESH_AXES`.
    """
    rules = []
    for rule in config.logical_axis_rules:
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise UserError(f"logical_axis_rules: {rule!r} is not a (logical name, mesh axes) pair")
        name, axes = rule
        axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
        for axis in axes if isinstance(axes, tuple) else (axes,):
            if axis is not None and axis not in MESH_AXES:
                raise UserError(f"logical_axis_rules: {name!r} -> {axis!r}: expected mesh axes "
                                f"from {list(MESH_AXES)}")
        rules.append((name, axes))
    return tuple(rules)


def make_mesh(config: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
    """The ``(data, fsdp, context, tensor)`` mesh of ``config.mesh`` over ``devices`` (default:
    all); one size may be -1, meaning the devices the others leave. Raises a one-line
    `UserError` for sizes that do not multiply to the number of devices."""
    devices = jax.devices() if devices is None else devices
    sizes = [config.mesh[axis] for axis in MESH_AXES]
    for axis, size in zip(MESH_AXES, sizes):
        if not isinstance(size, int) or size == 0 or size < -1:
            raise UserError(f"mesh.{axis}={size!r}: expected a positive int or -1")
    if sizes.count(-1) > 1:
        raise UserError(f"mesh: at most one axis may be -1; got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise UserError(f"mesh {dict(zip(MESH_AXES, sizes))}: {len(devices)} devices are "
                            f"not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise UserError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices; "
                        f"there are {len(devices)}")
    # Auto axes: XLA's partitioner places what the shardings and constraints leave open.
    return jax.make_mesh(tuple(sizes), MESH_AXES, (jax.sharding.AxisType.Auto,) * len(sizes),
                         devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """A ``(batch, seq_len)`` array: rows split over the data and fsdp axes, each row's
    positions over the context axis."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, LENGTH_AXIS))


def check_batch_fits_mesh(batch_size: int, mesh: Mesh, name: str = "batch_size") -> None:
    """A one-line `UserError` where data × fsdp does not divide ``batch_size``."""
    shards = math.prod(mesh.shape[axis] for axis in BATCH_AXES)
    if batch_size % shards:
        raise UserError(f"{name}={batch_size} is not divisible by mesh data × fsdp = {shards}")


def check_length_fits_mesh(seq_len: int, mesh: Mesh, layer_chunk_size: int = 0,
                           window_size: int = 0) -> None:
    """One-line errors for a sequence that ``mesh.context`` cannot split evenly, or whose
    device blocks ``model.layer_chunk_size`` cannot cut into chunks (it must divide each
    device's block, whose length must be at least ``window_size``)."""
    context = mesh.shape[LENGTH_AXIS]
    if seq_len % context:
        raise UserError(f"seq_len={seq_len} is not divisible by mesh.context={context}, which "
                        f"shards the sequence")
    if layer_chunk_size and context > 1:
        check_device_chunks(seq_len // context, layer_chunk_size, window_size, context)


def check_shardings_divide(shapes, shardings) -> None:
    """A one-line `UserError` for a parameter axis that its mesh axes do not divide (e.g.
    ``model.num_kv_heads=1`` key/value heads over ``mesh.tensor=2``). ``shapes``: a tree of
    arrays or ``jax.ShapeDtypeStruct``; ``shardings``: the same tree of NamedShardings."""
    for (path, shape), sharding in zip(jax.tree_util.tree_leaves_with_path(shapes),
                                       jax.tree.leaves(shardings)):
        for size, entry in zip(shape.shape, sharding.spec):
            axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
            shards = math.prod(sharding.mesh.shape[a] for a in axes)
            if size % shards:
                raise UserError(
                    f"parameter {jax.tree_util.keystr(path)} {shape.shape}: an axis of {size} "
                    f"does not split over mesh {'×'.join(axes)}={shards} (logical_axis_rules): "
                    f"choose mesh sizes that divide it (e.g. model.num_kv_heads, model.num_heads "
                    f"over mesh.tensor)")


def with_rules(jitted: Callable, mesh: Mesh, rules: tuple) -> Callable:
    """``jitted`` called (and so traced) with the mesh and logical axis rules in scope, so the
    model's ``with_logical_constraint`` calls shard its activations. The result has ``.lower``
    too, for ahead-of-time compilation (the memory analysis of bench/memory.py), and
    ``.export(platform, *args)`` for lowering what another platform runs (tests/test_lowering.py)."""
    def call(*args):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(*args)

    def lower(*args):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted.lower(*args)

    def export(platform: str, *args) -> jax.export.Exported:
        """``jax.export`` of ``jitted`` for ``platform`` (e.g. "tpu" from a CPU), its
        attention kernels chosen for that platform (`model.lowering_platform`)."""
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules), lowering_platform(platform):
            return jax.export.export(jitted, platforms=[platform])(*args)

    call.lower, call.export = lower, export
    return call


def process_rows(sharding: NamedSharding, batch_size: int) -> slice:
    """The rows of a ``(batch_size, ...)`` global batch that this process feeds: those its
    devices hold under ``sharding`` (`batch_sharding`). On P processes whose devices split the
    batch over data × fsdp, process p's rows are ``[p * B / P, (p + 1) * B / P)``; where
    processes share a batch shard (data × fsdp smaller than P), they feed the same rows.

    Raises a one-line `UserError` where a process's devices hold rows that are not one such
    aligned block (a device order that the per-process data pipeline cannot feed).
    """
    # Shape (batch_size, length shards): one column per block of the sequence.
    length_axes = sharding.spec[1] if len(sharding.spec) > 1 else None
    length_axes = () if length_axes is None else (
        (length_axes,) if isinstance(length_axes, str) else tuple(length_axes))
    columns = math.prod(sharding.mesh.shape[axis] for axis in length_axes)
    indices = sharding.addressable_devices_indices_map((batch_size, columns)).values()
    if sum(b - a for a, b in {index[1].indices(columns)[:2] for index in indices}) != columns:
        raise UserError(f"mesh {dict(sharding.mesh.shape)}: process {jax.process_index()}'s "
                        f"devices hold only part of each sequence; keep mesh.context within "
                        f"the devices of one process")
    # The distinct (start, stop) row ranges of this process's devices: equal-sized shards of
    # an even split, so they are one block exactly when their sizes add up to its span.
    held = sorted({index[0].indices(batch_size)[:2] for index in indices})
    start, stop = held[0][0], held[-1][1]
    contiguous = sum(end - begin for begin, end in held) == stop - start
    if not contiguous or batch_size % (stop - start) or start % (stop - start):
        raise UserError(f"mesh {dict(sharding.mesh.shape)}: process {jax.process_index()}'s "
                        f"devices hold rows {held} of each batch of {batch_size}, not one "
                        f"aligned block; give each process whole data × fsdp shards")
    return slice(start, stop)


def to_global_batch(batch: dict, sharding: NamedSharding, rows: slice | None = None) -> dict:
    """A dict of process-local numpy rows (``rows`` of ``batch``; default all) as global,
    sharded jax arrays."""
    return {k: jax.make_array_from_process_local_data(sharding, v if rows is None else v[rows])
            for k, v in batch.items()}
