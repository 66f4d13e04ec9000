"""Context parallelism for local attention: the sequence split over devices, a halo exchange.

When the logical axis ``length`` maps to mesh axes of total size C > 1 (the rule
``("length", "context")`` with ``mesh.context = C``) in the mesh that ``jax.set_mesh`` put in
scope, `context_parallel_attention` runs `local_attention` under ``jax.shard_map``. Each device
holds ``n = seq_len / C`` consecutive positions of q, k, v and receives from its neighbours,
through ``lax.ppermute``, only what its queries can see beyond its own block: the
``window_size_left`` keys, values, key mask and segment ids before it and the
``window_size_right`` after it (a halo exchange). Communication per layer is
O(window · heads · head_dim) per device however long the context, and no device holds more
than ``n + window_size_left + window_size_right`` positions. A window longer than ``n`` is
gathered from several neighbours (one ``ppermute`` per neighbour, still only the window); a
global layer's (the whole sequence) thus gathers every earlier block, and the blocked kernel
computes only the device's own queries, at their offset into those keys.

The devices at the two ends of the sequence receive nothing from beyond it: ``ppermute`` gives
them zeros, and an exchanged key validity hides those keys: as their segment id
(``NO_SEGMENT``, which no query has), so that every kernel that takes segment ids serves the
shards (``cudnn`` and ``splash`` take no mask); only a caller's own key mask travels as a
mask, with the validity folded in. The backward
pass is autodiff's: the transpose of a ``ppermute`` sends the halo's key and value gradients
back to the devices that own those keys.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec

from errors import UserError
from model.attention import (check_arguments, local_attention, resolve_implementation,
                             static_floats)
from model.kernels.common import NO_SEGMENT, pad_sequence
from model.kernels.xla import xla_local_attention


def context_parallel_attention(q, k, v, mask=None, rel_pos_emb=None, window_size_left=128,
                               window_size_right=128, dropout_rate=0.0, dropout_rng=None,
                               segment_ids=None, **kernel_options):
    """`local_attention` with the sequence sharded over the mesh axes of logical ``length``.

    Same arguments, semantics and result as `local_attention` (``kernel_options``:
    ``implementation``, ``block_size``, ``precision``, ``max_segments``, ``scale``,
    ``logit_soft_cap``), with q, k, v
    ``(batch..., heads, seq_len, head_dim)`` (k, v may have fewer heads, as for
    `local_attention`): the first axis is logical ``batch``, the last three ``heads`` (k and v:
    ``kv_heads`` where they have fewer), ``length``, ``kv``, sharded as the logical axis rules
    in scope say (an axis that does not divide evenly stays whole, except ``length``; query
    and key/value heads are split only where both split alike, so that each device holds
    whole groups). Without a mesh, or where
    ``length`` is not sharded, it is plain `local_attention`. Attention dropout draws its mask
    per device (the key folded with the device's mesh index), so it differs from the unsharded
    draw. Raises a one-line `UserError` if ``seq_len`` is not divisible by the sequence shards.
    """
    check_arguments(q, k, v, mask, rel_pos_emb, window_size_left, window_size_right,
                    dropout_rate, dropout_rng, segment_ids, scale=kernel_options.get("scale"),
                    logit_soft_cap=kernel_options.get("logit_soft_cap"))
    mesh = jax.sharding.get_abstract_mesh()
    grouped = q.ndim >= 3 and k.shape[-3] != q.shape[-3]
    axes, kv_axes = (_logical_mesh_axes(q.ndim, mesh, heads) for heads in
                     ("heads", "kv_heads" if grouped else "heads"))
    length_axes = axes[-2] if axes else ()
    shards = math.prod(mesh.shape[a] for a in length_axes)
    if shards == 1:
        return _unsplit_sequence(q, k, v, mask, rel_pos_emb, window_size_left,
                                 window_size_right, dropout_rate, dropout_rng, segment_ids,
                                 mesh, axes, kv_axes, kernel_options)
    seq_len = q.shape[-2]
    if seq_len % shards:
        raise UserError(f"seq_len={seq_len} is not divisible by mesh."
                        f"{'×'.join(length_axes)}={shards}, which shards the sequence")
    spec, kv_spec = _array_specs(q, k, mesh, axes, kv_axes, length_axes)
    length_axis_name = spec[-2]
    local_len = seq_len // shards
    # Halo widths, capped at what lies before (after) the last (first) block.
    before = min(window_size_left, seq_len - local_len)
    after = min(window_size_right, seq_len - local_len)
    # Halos at least as long as the device's block (a global layer's: every earlier block)
    # would make padded queries most of the work: the blocked kernel then takes the device's
    # own queries at their offset into the keys instead (the looped schedule; not with
    # rel_pos_emb).
    # Where the validity becomes segment ids, it adds at most two runs to a row's documents
    # (nothing before the first block, nothing after the last).
    max_segments = kernel_options.get("max_segments")
    kernel_options["max_segments"] = None if max_segments is None and mask is not None \
        else (max_segments or 1) + 2
    implementation = resolve_implementation(
        kernel_options.get("implementation", "auto"), q.dtype, has_mask=mask is not None,
        dropout_rate=dropout_rate, window_size_right=window_size_right, has_segment_ids=True,
        max_segments=kernel_options["max_segments"],
        has_logit_soft_cap=kernel_options.get("logit_soft_cap") is not None)
    queries_at_offset = before + after >= local_len and rel_pos_emb is None \
        and implementation == "xla"
    inputs, specs = _sharded_inputs(q, k, v, mask, rel_pos_emb, dropout_rng, segment_ids, spec,
                                    kv_spec)

    def attend_shard(inputs):
        # Keys and what describes them (validity, segment ids, with a trailing axis so that the
        # sequence is axis -2 of each): this device's block with its halos around it.
        keys = {name: inputs[name] if name in ("k", "v") else inputs[name][..., None]
                for name in ("k", "v", "valid", "segment_ids") if name in inputs}
        received = [_halo(keys, length_axis_name, shards, before, from_previous=True), keys,
                    _halo(keys, length_axis_name, shards, after, from_previous=False)]
        extended = jax.tree.map(lambda *parts: jnp.concatenate(parts, axis=-2),
                                *[r for r in received if r is not None])
        valid, segments = extended["valid"][..., 0], extended.get("segment_ids")
        if mask is None:  # the validity as segment ids; no mask
            segments = jnp.where(valid, 0 if segments is None else segments[..., 0], NO_SEGMENT)
            valid = None
        elif segments is not None:
            segments = segments[..., 0]
        rng = inputs.get("dropout_rng")
        if rng is not None:
            rng = jax.random.fold_in(rng, lax.axis_index(tuple(mesh.axis_names)))
        if queries_at_offset:
            return xla_local_attention(
                inputs["q"], extended["k"], extended["v"], valid, None, window_size_left,
                window_size_right, dropout_rate, rng, segments,
                block_size=kernel_options.get("block_size"),
                precision=kernel_options.get("precision"), max_segments=None,
                query_offset=before, **static_floats(
                    scale=kernel_options.get("scale"),
                    logit_soft_cap=kernel_options.get("logit_soft_cap")))
        # Queries padded to the keys' length, so that positions line up; the outputs of the
        # padding are dropped (no gradient flows back through them).
        q = pad_sequence(inputs["q"], before, after, axis=-2)
        out = local_attention(
            q, extended["k"], extended["v"], valid, inputs.get("rel_pos_emb"), window_size_left,
            window_size_right, dropout_rate, rng, segments, **kernel_options)
        return out[..., before:before + local_len, :]

    # Pallas kernels (splash) declare no per-axis variance for their outputs: shard_map's
    # variance check would refuse them.
    return jax.shard_map(attend_shard, in_specs=(specs,), out_specs=PartitionSpec(*spec),
                         check_vma=False)(inputs)


def _unsplit_sequence(q, k, v, mask, rel_pos_emb, window_size_left, window_size_right,
                      dropout_rate, dropout_rng, segment_ids, mesh, axes, kv_axes,
                      kernel_options):
    """`local_attention` where the sequence is whole on each device. A Pallas kernel (splash)
    cannot be partitioned by XLA: where a mesh splits the batch or the heads, each device
    runs it on its own under ``jax.shard_map``."""
    arguments = (mask, rel_pos_emb, window_size_left, window_size_right, dropout_rate,
                 dropout_rng, segment_ids)
    implementation = resolve_implementation(
        kernel_options.get("implementation", "auto"), q.dtype, has_mask=mask is not None,
        has_rel_pos_emb=rel_pos_emb is not None, dropout_rate=dropout_rate,
        window_size_right=window_size_right, has_segment_ids=segment_ids is not None,
        max_segments=kernel_options.get("max_segments"),
        has_logit_soft_cap=kernel_options.get("logit_soft_cap") is not None)
    if implementation != "splash" or not axes:
        return local_attention(q, k, v, *arguments, **kernel_options)
    spec, kv_spec = _array_specs(q, k, mesh, axes, kv_axes, ())
    inputs, specs = _sharded_inputs(q, k, v, mask, rel_pos_emb, dropout_rng, segment_ids, spec,
                                    kv_spec)
    del inputs["valid"], specs["valid"]  # splash takes no mask (a given one is refused)

    def attend_shard(inputs):
        return local_attention(inputs["q"], inputs["k"], inputs["v"], mask, None,
                               window_size_left, window_size_right, dropout_rate, None,
                               inputs.get("segment_ids"), **kernel_options)

    return jax.shard_map(attend_shard, in_specs=(specs,), out_specs=PartitionSpec(*spec),
                         check_vma=False)(inputs)


def _array_specs(q, k, mesh, axes, kv_axes, length_axes) -> tuple[list, list]:
    """The PartitionSpec entries of q and of k, v (``axes``, ``kv_axes``: their mesh axes per
    array axis, `_logical_mesh_axes`; ``length_axes``: the sequence's)."""
    # An axis that does not divide evenly (a small batch, few heads) is computed whole on each
    # device instead.
    spec = [_spec_entry(a) if a == length_axes or size % math.prod(mesh.shape[x] for x in a) == 0
            else None for size, a in zip(q.shape, axes)]
    kv_spec = list(spec)
    if q.ndim >= 3:
        heads_axes = axes[-3]
        split_alike = kv_axes[-3] == heads_axes and not (
            k.shape[-3] % math.prod(mesh.shape[x] for x in heads_axes))
        if not split_alike or spec[-3] is None:
            spec[-3] = kv_spec[-3] = None
    return spec, kv_spec


def _sharded_inputs(q, k, v, mask, rel_pos_emb, dropout_rng, segment_ids, spec,
                    kv_spec) -> tuple[dict, dict]:
    """The arrays that `jax.shard_map` splits and their PartitionSpecs (``spec``: q's entries,
    ``kv_spec``: k and v's), by name: q, k, v, the key validity ``valid`` and, where given,
    segment_ids, rel_pos_emb and dropout_rng (replicated)."""
    # The key validity mask travels with the keys; without a mask it is all true (one row).
    valid = (jnp.ones((1,) * (q.ndim - 2) + (q.shape[-2],), bool) if mask is None
             else mask.astype(bool))
    inputs = {"q": q, "k": k, "v": v, "valid": valid}
    specs = {"q": PartitionSpec(*spec), "k": PartitionSpec(*kv_spec),
             "v": PartitionSpec(*kv_spec)}
    specs["valid"] = _broadcast_spec(valid.shape, kv_spec[:-1])
    if segment_ids is not None:
        inputs["segment_ids"] = segment_ids
        specs["segment_ids"] = _broadcast_spec(segment_ids.shape, kv_spec[:-1])
    if rel_pos_emb is not None:
        inputs["rel_pos_emb"] = rel_pos_emb
        specs["rel_pos_emb"] = PartitionSpec(*_broadcast_spec(rel_pos_emb.shape[:-2], spec[:-2]),
                                             None, None)
    if dropout_rng is not None:
        inputs["dropout_rng"] = dropout_rng
        specs["dropout_rng"] = PartitionSpec()
    return inputs, specs


def _broadcast_spec(shape, lead_spec) -> PartitionSpec:
    """The spec of an array that broadcasts against ``lead_spec``'s axes (right-aligned)."""
    offset = len(lead_spec) - len(shape)
    return PartitionSpec(*(None if size == 1 else lead_spec[offset + i]
                           for i, size in enumerate(shape)))


def _logical_mesh_axes(ndim: int, mesh, heads: str) -> list[tuple[str, ...]]:
    """Per axis of a ``(batch..., heads, length, kv)`` array of rank ``ndim``, the mesh axes
    that the logical axis rules in scope give it (``heads``: its heads axis's logical name);
    [] without a mesh."""
    if mesh.empty:
        return []
    names = [None] * ndim
    names[-3:] = [heads, "length", "kv"][-ndim:]
    if ndim >= 4:
        names[0] = "batch"
    return [_mesh_axes(entry, mesh) for entry in nn.logical_to_mesh_axes(tuple(names))]


def sequence_shards() -> int:
    """How many devices the logical ``length`` axis splits over in the mesh and axis rules in
    scope (1 without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = _logical_mesh_axes(3, mesh, "heads")
    return math.prod(mesh.shape[a] for a in axes[-2]) if axes else 1


def _mesh_axes(entry, mesh) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry that the mesh has."""
    entry = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    return tuple(a for a in entry if a in mesh.shape)


def _spec_entry(mesh_axes: tuple[str, ...]):
    """A PartitionSpec entry: None, one axis name, or a tuple of them."""
    return None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes


def _halo(arrays: dict, axis_name, shards: int, width: int, from_previous: bool) -> dict | None:
    """The ``width`` positions just before (``from_previous``) or after this device's block,
    from the devices that hold them: each array ``(..., local_len, last)`` gives
    ``(..., width, last)``, zeros beyond the ends of the sequence. One ``ppermute`` per
    neighbour, each sending only what the receiver needs."""
    if width == 0:
        return None
    local_len = next(iter(arrays.values())).shape[-2]
    pieces = []
    for hop in range(1, -(-width // local_len) + 1):
        count = min(local_len, width - (hop - 1) * local_len)
        start = local_len - count if from_previous else 0
        sent = {name: lax.slice_in_dim(x, start, start + count, axis=x.ndim - 2)
                for name, x in arrays.items()}
        pairs = [(i, i + hop) if from_previous else (i + hop, i) for i in range(shards - hop)]
        pieces.append(lax.ppermute(sent, axis_name, pairs))
    if from_previous:
        pieces.reverse()  # the farthest neighbour's positions come first
    return jax.tree.map(lambda *parts: jnp.concatenate(parts, axis=-2), *pieces)
