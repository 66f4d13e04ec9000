"""The scanned layer stack with rematerialisation by hand: a ``jax.custom_vjp`` over the layers
(`layer_stack`) that keeps only each layer's input (as raw bits) and recomputes the layer in
the backward pass chunk by chunk along the sequence (`_layer_in_chunks`), each chunk with the
``window_size`` tokens before it. What `model.transformer.TransformerLM` runs with
``scan_layers`` and ``remat``; `unstack_layers` turns its stacked parameters into unrolled ones.

The stack runs the block it is given (`model.transformer.DecoderBlock`): a Flax module built
as ``block(config)`` and applied as ``(x, segment_ids, positions, deterministic,
global_layer) -> x``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from errors import UserError
from model.config import TransformerConfig
from model.context_parallel import sequence_shards
from model.kernels.common import NO_SEGMENT


def global_layer_mask(config: TransformerConfig) -> jax.Array:
    """``(num_layers,)`` bool: which layers are global."""
    return jnp.isin(jnp.arange(config.num_layers), jnp.array(config.global_layer_indices, int))


def unstack_layers(params, config: TransformerConfig):
    """The parameters of a ``scan_layers`` model (``layers``: each leaf ``(num_layers, ...)``)
    as those of the same model unscanned (``layer_0``, ``layer_1``, ...); others unchanged."""
    params = dict(params)
    stacked = params.pop("layers")
    return params | {f"layer_{i}": jax.tree.map(lambda x, i=i: x[i], stacked)
                     for i in range(config.num_layers)}


def _layer_chunks(config: TransformerConfig, length: int,
                  global_layer: bool = False) -> tuple[int, int, int]:
    """``(num_chunks, chunk, span)``: a layer over ``length`` tokens runs as ``num_chunks``
    chunks of ``chunk`` outputs, each computed from ``span`` tokens (the chunk and the
    ``window_size`` tokens its attention reaches back to). A global layer reaches back to the
    start: it runs whole."""
    chunk = config.layer_chunk_size
    if not chunk or chunk >= length or global_layer:
        return 1, length, length
    if length % chunk:
        raise UserError(f"model.layer_chunk_size={chunk} does not divide the sequence length "
                        f"{length}: expected a divisor of it, or 0")
    return length // chunk, chunk, min(length, chunk + config.window_size)


def _layer(block_type, config: TransformerConfig, deterministic: bool, layer_params, layer, x,
           segment_ids, positions, dropout_key, d_out=None):
    """`_layer_in_chunks` for layer ``layer`` (traced), global or local as the config says
    (a ``lax.cond`` where the model has both)."""
    def run(global_layer: bool):
        return _layer_in_chunks(block_type, config, deterministic, layer_params, layer, x,
                                segment_ids, positions, dropout_key, d_out, global_layer)

    if not config.global_layer_indices:
        return run(False)
    return jax.lax.cond(global_layer_mask(config)[layer], lambda: run(True), lambda: run(False))


def _layer_in_chunks(block_type, config: TransformerConfig, deterministic: bool, layer_params,
                     layer, x, segment_ids, positions, dropout_key, d_out=None,
                     global_layer=False):
    """One block, ``block_type(config)`` (a `model.transformer.DecoderBlock`), on ``x (batch,
    seq_len, d_model)``, chunk by chunk (`_layer_chunks`).

    The block is causal with a window of ``window_size`` tokens and otherwise position-wise,
    so each chunk's outputs are exact from its span of inputs. Returns the output; given the
    output's cotangent ``d_out``, returns ``(d_params, d_x)`` instead, one chunk's backward
    pass at a time (``d_x`` summed in float32 where spans overlap).
    """
    shards = sequence_shards()
    if shards > 1 and config.layer_chunk_size and not global_layer:
        return _layer_in_device_chunks(block_type, config, deterministic, layer_params, layer, x,
                                       segment_ids, positions, dropout_key, d_out, shards)
    batch, length, _ = x.shape
    num_chunks, chunk, span = _layer_chunks(config, length, global_layer)
    if positions is None:  # a chunk's rotary positions are its place in the sequence
        positions = jnp.arange(length)[None]

    def span_of(index):
        start = jnp.clip(index * chunk - config.window_size, 0, length - span)
        rows = lambda a: None if a is None else jax.lax.dynamic_slice_in_dim(a, start, span, 1)  # noqa: E731
        key = None if dropout_key is None else jax.random.fold_in(
            jax.random.fold_in(dropout_key, layer), index)
        block = lambda p, x: block_type(config).apply(  # noqa: E731
            {"params": p}, x, rows(segment_ids), rows(positions), deterministic, global_layer,
            rngs=None if key is None else {"dropout": key})
        return start, index * chunk - start, rows(x), block

    if d_out is None:
        def forward(index):
            _, offset, x_span, block = span_of(index)
            return jax.lax.dynamic_slice_in_dim(block(layer_params, x_span), offset, chunk, 1)

        out = jax.lax.map(forward, jnp.arange(num_chunks))  # (num_chunks, batch, chunk, d)
        return jnp.moveaxis(out, 0, 1).reshape(x.shape)

    def backward(sums, index):
        d_params_sum, d_x_sum = sums
        start, offset, x_span, block = span_of(index)
        out, block_vjp = jax.vjp(block, layer_params, x_span)
        d_out_chunk = jax.lax.dynamic_slice_in_dim(d_out, index * chunk, chunk, 1)
        d_params, d_x = block_vjp(jax.lax.dynamic_update_slice_in_dim(
            jnp.zeros_like(out), d_out_chunk, offset, 1))
        d_x_rows = jax.lax.dynamic_slice_in_dim(d_x_sum, start, span, 1) + d_x
        return (jax.tree.map(jnp.add, d_params_sum, d_params),
                jax.lax.dynamic_update_slice_in_dim(d_x_sum, d_x_rows, start, 1)), None

    zeros = (jax.tree.map(jnp.zeros_like, layer_params), jnp.zeros(x.shape, jnp.float32))
    (d_params, d_x), _ = jax.lax.scan(backward, zeros, jnp.arange(num_chunks))
    return d_params, d_x.astype(x.dtype)


def check_device_chunks(block: int, chunk: int, window: int, shards: int) -> None:
    """A one-line `UserError` where each of ``shards`` devices' ``block`` positions cannot run
    in chunks of ``chunk`` under context parallelism: the chunk must divide the block, and the
    window (the halo from the previous device) must not exceed it."""
    if block % chunk or window > block:
        raise UserError(f"model.layer_chunk_size={chunk} with mesh.context={shards}: each "
                        f"device's block of {block} positions runs in chunks, so the chunk "
                        f"must divide it and model.window_size={window} must not exceed it")


def _layer_in_device_chunks(block_type, config: TransformerConfig, deterministic: bool,
                            layer_params, layer, x, segment_ids, positions, dropout_key, d_out,
                            shards: int):
    """`_layer_in_chunks` where the sequence is split over ``shards`` devices (context
    parallelism): every device runs its own block in ``layer_chunk_size`` chunks at once.

    The global arrays are viewed as ``(batch, shards, local_len, ...)``, the shards axis on the
    devices that hold the blocks, and each block gets the ``window_size`` positions before it
    from the previous device (one collective permute per layer; the first device's are
    marked ``NO_SEGMENT``). Chunk ``c`` is then the same slice of every device's extended
    block, computed as ``batch × shards`` independent rows of ``window_size + chunk``
    positions with the axis rules moved from the sequence to the rows: nothing crosses a
    device inside the chunk loop. The backward pass sends the halo's input gradients back to
    the devices that own those positions.
    """
    batch, length, features = x.shape
    local_len, chunk, window = length // shards, config.layer_chunk_size, config.window_size
    check_device_chunks(local_len, chunk, window, shards)
    num_chunks, span = local_len // chunk, window + chunk
    if positions is None:  # a chunk's rotary positions are its place in the sequence
        positions = jnp.arange(length)[None]
    positions = jnp.broadcast_to(positions, (batch, length))
    segment_ids = (jnp.zeros((batch, length), jnp.int32) if segment_ids is None
                   else segment_ids)

    def extended(a, fill):  # (batch, length, ...) -> (batch, shards, window + local_len, ...)
        blocks = a.reshape(batch, shards, local_len, *a.shape[2:])
        before = jnp.roll(blocks[:, :, local_len - window:], 1, axis=1)  # from device d - 1
        before = before.at[:, 0].set(fill)  # nothing precedes the first block
        return jnp.concatenate([before, blocks], axis=2)

    x_ext = extended(x, 0)
    ids_ext, positions_ext = extended(segment_ids, NO_SEGMENT), extended(positions, 0)
    rules = _rows_rules(nn.get_logical_axis_rules())

    def span_of(index):
        rows = lambda a: jax.lax.dynamic_slice_in_dim(a, index * chunk, span, 2).reshape(  # noqa: E731
            batch * shards, span, *a.shape[3:])
        key = None if dropout_key is None else jax.random.fold_in(
            jax.random.fold_in(dropout_key, layer), index)

        def block(p, x):
            with nn.logical_axis_rules(rules):  # the rows are sharded, not their positions
                return block_type(config).apply(
                    {"params": p}, x, rows(ids_ext), rows(positions_ext), deterministic, False,
                    rngs=None if key is None else {"dropout": key})
        return rows(x_ext), block

    def to_sequence(chunks):  # (num_chunks, batch · shards, chunk, f) -> (batch, length, f)
        chunks = chunks.reshape(num_chunks, batch, shards, chunk, features)
        return jnp.moveaxis(chunks, 0, 2).reshape(batch, length, features)

    if d_out is None:
        def forward(index):
            x_span, block = span_of(index)
            return block(layer_params, x_span)[:, window:]

        return to_sequence(jax.lax.map(forward, jnp.arange(num_chunks)))

    d_out_blocks = d_out.reshape(batch, shards, local_len, features)

    def backward(sums, index):
        d_params_sum, d_ext_sum = sums
        x_span, block = span_of(index)
        out, block_vjp = jax.vjp(block, layer_params, x_span)
        d_out_chunk = jax.lax.dynamic_slice_in_dim(d_out_blocks, index * chunk, chunk, 2)
        d_params, d_x = block_vjp(jnp.concatenate(
            [jnp.zeros_like(out[:, :window]),
             d_out_chunk.reshape(batch * shards, chunk, features).astype(out.dtype)], axis=1))
        d_rows = jax.lax.dynamic_slice_in_dim(d_ext_sum, index * chunk, span, 2) + d_x.reshape(
            batch, shards, span, features)
        return (jax.tree.map(jnp.add, d_params_sum, d_params),
                jax.lax.dynamic_update_slice_in_dim(d_ext_sum, d_rows, index * chunk, 2)), None

    zeros = (jax.tree.map(jnp.zeros_like, layer_params),
             jnp.zeros((batch, shards, window + local_len, features), jnp.float32))
    (d_params, d_ext), _ = jax.lax.scan(backward, zeros, jnp.arange(num_chunks))
    # The halo's gradients belong to the previous device's last positions.
    d_halo = jnp.roll(d_ext[:, :, :window], -1, axis=1).at[:, shards - 1].set(0)
    d_x = d_ext[:, :, window:].at[:, :, local_len - window:].add(d_halo)
    return d_params, d_x.reshape(batch, length, features).astype(x.dtype)


def _rows_rules(rules) -> tuple:
    """The logical axis rules with the sequence's mesh axes given to the batch instead: for
    `_layer_in_device_chunks`' rows, each of one device's positions."""
    length_axes = next((axes for name, axes in rules if name == "length"), None)
    if length_axes is None:
        return tuple(rules)
    length_axes = (length_axes,) if isinstance(length_axes, str) else tuple(length_axes)

    def axes_of(axes):
        return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)

    return tuple((name, None) if name == "length" else
                 (name, axes_of(axes) + length_axes) if name == "batch" else (name, axes)
                 for name, axes in rules)


def _bits_dtype(dtype) -> Any:
    return jnp.dtype(f"uint{jnp.dtype(dtype).itemsize * 8}")


def _layer_stack_forward(block_type, config, deterministic, params, x, segment_ids, positions,
                         dropout_key):
    def layer(x, inputs):
        index, layer_params = inputs
        out = _layer(block_type, config, deterministic, layer_params, index, x, segment_ids,
                     positions, dropout_key)
        return out, jax.lax.bitcast_convert_type(x, _bits_dtype(x.dtype))

    return jax.lax.scan(layer, x, (jnp.arange(config.num_layers), params))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def layer_stack(block_type, config, deterministic, params, x, segment_ids, positions,
                dropout_key):
    """The scanned layers with ``params`` (each leaf stacked ``(num_layers, ...)``) on ``x
    (batch, seq_len, d_model)``, keeping only each layer's input for the backward pass, which
    recomputes the layer from it, chunk by chunk (`_layer_in_chunks`).

    ``block_type`` (static): the layer, `model.transformer.DecoderBlock`; ``config``: the
    `TransformerConfig`; ``deterministic`` (static bool): no dropout; ``segment_ids`` and
    ``positions``: ``(batch, seq_len)`` int or None; ``dropout_key``: a PRNG key (None without
    dropout), folded with the layer and the chunk. Returns ``(batch, seq_len, d_model)`` in x's
    dtype. Raises a one-line `UserError` where ``layer_chunk_size`` does not divide seq_len.

    What ``nn.remat`` inside ``nn.scan`` does, with the saved inputs held as raw bits (uint16
    for bfloat16): XLA:CPU widens a bfloat16 array that a loop slices to float32 and hoists
    that copy of all the layers' inputs out of the backward loop; integers it leaves alone.
    """
    return _layer_stack_forward(block_type, config, deterministic, params, x, segment_ids,
                                positions, dropout_key)[0]


def _layer_stack_fwd(block_type, config, deterministic, params, x, segment_ids, positions,
                     dropout_key):
    out, inputs_bits = _layer_stack_forward(block_type, config, deterministic, params, x,
                                            segment_ids, positions, dropout_key)
    return out, (params, inputs_bits, segment_ids, positions, dropout_key)


def _layer_stack_bwd(block_type, config, deterministic, residuals, d_out):
    params, inputs_bits, segment_ids, positions, dropout_key = residuals

    def layer(d_x, inputs):
        index, layer_params, x_bits = inputs
        x = jax.lax.bitcast_convert_type(x_bits, d_out.dtype)
        d_params, d_x = _layer(block_type, config, deterministic, layer_params, index, x,
                               segment_ids, positions, dropout_key, d_out=d_x)
        return d_x, d_params

    d_x, d_params = jax.lax.scan(layer, d_out, (jnp.arange(config.num_layers), params,
                                                inputs_bits), reverse=True)
    return d_params, d_x, None, None, None


layer_stack.defvjp(_layer_stack_fwd, _layer_stack_bwd)
