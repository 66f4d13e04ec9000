"""Train a local-attention language model.

    python train.py [--config=configs/default.py] [--workdir=runs/default] [--config.KEY=VALUE ...]

Running the same command again on the same workdir resumes from its latest checkpoint, exactly
where the interrupted run was (on CPU the resumed run is bit-identical to an uninterrupted one).

The path through this file: `train_and_evaluate` reads the config, builds the data
(data/pipeline.py), the device mesh and the sharded `TrainState` (`create_train_state`: the
logical axis names of model/transformer.py mapped to mesh axes by ``config.logical_axis_rules``),
restores the latest checkpoint (checkpoints.py), then runs the jitted `make_train_step` (model →
model/attention.py's kernel) with periodic evaluation (`make_eval_step`), logging and
asynchronous checkpoints. evaluate.py and generate.py reuse `load_for_inference`; the command
line (flags, one-line errors, a multi-process launch) is cli.py's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import flags, logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import cli
from checkpoints import Checkpoints
from configs import data as data_config
from data import TrainBatches, make_tokenizer, packed_examples, validation_batches
from data.packing import documents_per_row
from data.tokenizers import Tokenizer
from model import (TransformerConfig, TransformerLM, count_parameters, generate,
                   training_flops_per_token)

MESH_AXES = ("data", "fsdp", "context", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over these mesh axes
LENGTH_AXIS = "context"  # and the sequence over this one (model/context_parallel.py)
# Fields that must not change when a run resumes, by what depends on them: the arrays of the
# checkpoint (their shapes and what they mean: the model and its vocabulary) ...
PARAMETER_FIELDS = ("model", "data.tokenizer", "data.sentencepiece_model",
                    "data.sentencepiece_vocab_size")
# ... and the data iterator's saved position (which examples, cut how, in which order).
DATA_ORDER_FIELDS = ("seed", "seq_len", "batch_size", "data.source", "data.paths",
                     "data.hf_name", "data.hf_config", "data.tfds_name", "data.packing",
                     "data.max_documents", "data.validation_fraction", "data.passkey_fraction",
                     "data.passkey_questions")
# model.* fields that change neither the parameters nor the data: free to change on resume.
_MODEL_FIELDS_FREE_ON_RESUME = ("attention_implementation", "max_documents_per_row",
                                "layer_chunk_size", "loss_chunk_size")
_MODEL_DEFAULTS = {field.name: field.default for field in dataclasses.fields(TransformerConfig)
                   if field.default is not dataclasses.MISSING}
_DATA_DEFAULTS = data_config.get_config().to_dict()


@flax.struct.dataclass
class TrainState:
    """Everything the jitted step updates; saved whole in each checkpoint.

    step: int32 scalar, optimizer steps taken. params: the model's float32 parameters.
    opt_state: optax state (AdamW moments, shaped and sharded like params). rng: uint32 (2,)
    base key; step ``s`` draws its dropout keys from ``fold_in(rng, s)``, so the randomness of
    a step does not depend on how the run got there.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


# --- configuration ----------------------------------------------------------------------------

def validate_config(config: ml_collections.ConfigDict) -> None:
    """One-line ValueErrors for bad training fields (model and data fields are checked where
    they are used: TransformerConfig.from_config, data/)."""
    def positive_int(name, minimum=1):
        value = config[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name}={value!r}: expected an int >= {minimum}")

    for name in ("num_train_steps", "batch_size", "seq_len", "grad_accum_steps",
                 "checkpoint_every_steps", "log_every_steps", "keep_checkpoints"):
        positive_int(name)
    for name in ("warmup_steps", "eval_every_steps", "eval_batches", "sample_tokens"):
        positive_int(name, minimum=0)
    for name in ("learning_rate", "weight_decay", "grad_clip_norm", "min_learning_rate_ratio",
                 "peak_flops_per_device"):
        if not isinstance(config[name], (int, float)) or config[name] < 0:
            raise ValueError(f"{name}={config[name]!r}: expected a number >= 0")
    if config.learning_rate == 0:
        raise ValueError("learning_rate=0: expected a positive number")
    if config.decay_schedule not in DECAY_SCHEDULES:
        raise ValueError(f"decay_schedule={config.decay_schedule!r}: expected one of "
                         f"{list(DECAY_SCHEDULES)}")
    if config.warmup_steps >= config.num_train_steps:
        raise ValueError(f"warmup_steps={config.warmup_steps}: expected fewer than "
                         f"num_train_steps={config.num_train_steps}")
    for name in ("adam_b1", "adam_b2"):
        if not 0 <= config[name] < 1:
            raise ValueError(f"{name}={config[name]!r}: expected a number in [0, 1)")
    if config.batch_size % config.grad_accum_steps:
        raise ValueError(f"batch_size={config.batch_size} is not divisible by "
                         f"grad_accum_steps={config.grad_accum_steps}")


def model_config(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> TransformerConfig:
    """The `TransformerConfig` of ``config.model``, with the tokenizer's vocabulary."""
    return TransformerConfig.from_config(config.model.to_dict(), vocab_size=tokenizer.vocab_size)


def axis_rules(config: ml_collections.ConfigDict) -> tuple:
    """``config.logical_axis_rules`` as Flax wants them (tuples; JSON round trips give lists)."""
    rules = []
    for rule in config.logical_axis_rules:
        if len(rule) != 2 or not isinstance(rule[0], str):
            raise ValueError(f"logical_axis_rules: {rule!r} is not a (logical name, mesh axes) pair")
        name, axes = rule
        axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
        for axis in axes if isinstance(axes, tuple) else (axes,):
            if axis is not None and axis not in MESH_AXES:
                raise ValueError(f"logical_axis_rules: {name!r} -> {axis!r}: expected mesh axes "
                                 f"from {list(MESH_AXES)}")
        rules.append((name, axes))
    return tuple(rules)


def make_mesh(config: ml_collections.ConfigDict, devices: list | None = None) -> Mesh:
    """The ``(data, fsdp, context, tensor)`` mesh of ``config.mesh`` over ``devices`` (default:
    all); one size may be -1, meaning the devices the others leave."""
    devices = jax.devices() if devices is None else devices
    sizes = [config.mesh[axis] for axis in MESH_AXES]
    for axis, size in zip(MESH_AXES, sizes):
        if not isinstance(size, int) or size == 0 or size < -1:
            raise ValueError(f"mesh.{axis}={size!r}: expected a positive int or -1")
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1; got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: {len(devices)} devices are "
                             f"not divisible by {known}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices; "
                         f"there are {len(devices)}")
    # Auto axes: XLA's partitioner places what the shardings and constraints leave open.
    return jax.make_mesh(tuple(sizes), MESH_AXES, (jax.sharding.AxisType.Auto,) * len(sizes),
                         devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """A ``(batch, seq_len)`` array: rows split over the data and fsdp axes, each row's
    positions over the context axis."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, LENGTH_AXIS))


def check_batch_fits_mesh(batch_size: int, mesh: Mesh, name: str = "batch_size") -> None:
    shards = math.prod(mesh.shape[axis] for axis in BATCH_AXES)
    if batch_size % shards:
        raise ValueError(f"{name}={batch_size} is not divisible by mesh data × fsdp = {shards}")


def check_length_fits_mesh(seq_len: int, mesh: Mesh, layer_chunk_size: int = 0) -> None:
    """One-line errors for a sequence that ``mesh.context`` cannot split evenly, or that
    ``model.layer_chunk_size`` would slice across the devices that hold it."""
    context = mesh.shape[LENGTH_AXIS]
    if seq_len % context:
        raise ValueError(f"seq_len={seq_len} is not divisible by mesh.context={context}, which "
                         f"shards the sequence")
    if layer_chunk_size and context > 1:
        raise ValueError(f"model.layer_chunk_size={layer_chunk_size} slices the whole sequence, "
                         f"which mesh.context={context} splits over devices: set "
                         f"model.layer_chunk_size=0 (each device holds 1/{context} of it)")


# --- state, optimizer, steps ------------------------------------------------------------------

DECAY_SCHEDULES = ("cosine", "linear")


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup from 0, then ``config.decay_schedule`` (cosine or linear) down to
    ``learning_rate * min_learning_rate_ratio`` at ``num_train_steps``."""
    end_value = config.learning_rate * config.min_learning_rate_ratio
    if config.decay_schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
            decay_steps=config.num_train_steps, end_value=end_value)
    return optax.join_schedules([
        optax.linear_schedule(0.0, config.learning_rate, config.warmup_steps),
        optax.linear_schedule(config.learning_rate, end_value,
                              config.num_train_steps - config.warmup_steps),
    ], boundaries=[config.warmup_steps])


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW with global-norm clipping; weight decay on kernels and embeddings only."""
    def decayed(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: any(getattr(k, "key", None) in ("kernel", "embedding") for k in path),
            params)

    adamw = optax.adamw(learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2,
                        weight_decay=config.weight_decay, mask=decayed)
    # Always the same chain (an infinite norm when clipping is off), so the optimizer state,
    # and so a checkpoint, does not depend on grad_clip_norm.
    return optax.chain(optax.clip_by_global_norm(config.grad_clip_norm or float("inf")), adamw)


def create_train_state(config: ml_collections.ConfigDict, model: TransformerLM, mesh: Mesh,
                       optimizer: optax.GradientTransformation, *, abstract: bool = False):
    """``(state, state_shardings)``: a fresh `TrainState` laid out on ``mesh``.

    Each parameter (and its AdamW moments) is sharded as its logical axis names map through
    ``config.logical_axis_rules``; scalars are replicated. The random initialisation does not
    depend on the mesh. With ``abstract=True`` the state is a tree of
    ``jax.ShapeDtypeStruct`` with shardings (a restore target), and nothing is computed.
    """
    def initial_state(seed):
        init_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed))
        params = model.init(init_key, jnp.zeros((1, 1), jnp.int32))["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=optimizer.init(params), rng=dropout_key)

    boxed = jax.eval_shape(initial_state, config.seed)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, axis_rules(config))
    _check_shardings_divide(nn.unbox(boxed.params), shardings.params)
    if abstract:
        shapes = nn.unbox(boxed)
        return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                                      sharding=sharding),
                            shapes, shardings), shardings
    init = jax.jit(lambda seed: nn.unbox(initial_state(seed)), static_argnums=0,
                   out_shardings=shardings)
    return init(config.seed), shardings


def _check_shardings_divide(shapes, shardings) -> None:
    """A one-line error for a parameter axis that its mesh axes do not divide (e.g.
    ``model.num_kv_heads=1`` key/value heads over ``mesh.tensor=2``)."""
    for (path, shape), sharding in zip(jax.tree_util.tree_leaves_with_path(shapes),
                                       jax.tree.leaves(shardings)):
        for size, entry in zip(shape.shape, sharding.spec):
            axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
            shards = math.prod(sharding.mesh.shape[a] for a in axes)
            if size % shards:
                raise ValueError(
                    f"parameter {jax.tree_util.keystr(path)} {shape.shape}: an axis of {size} "
                    f"does not split over mesh {'×'.join(axes)}={shards} (logical_axis_rules): "
                    f"choose mesh sizes that divide it (e.g. model.num_kv_heads, model.num_heads "
                    f"over mesh.tensor)")


def _token_losses(model: TransformerLM, params, batch: dict, deterministic: bool = True,
                  dropout_key: jax.Array | None = None) -> jax.Array:
    """Cross-entropy of each target, ``(batch, seq_len)`` float32 (0 where loss_mask is 0)."""
    rngs = None if deterministic else {"dropout": dropout_key}
    # The model computes the losses in chunks: the (tokens × vocabulary) logits never exist.
    losses = model.apply({"params": params}, batch["inputs"], segment_ids=batch.get("segment_ids"),
                         positions=batch.get("positions"), deterministic=deterministic,
                         targets=batch["targets"], rngs=rngs)
    return losses * batch["loss_mask"]


def _with_rules(jitted: Callable, mesh: Mesh, rules: tuple) -> Callable:
    """``jitted`` called (and so traced) with the mesh and logical axis rules in scope, so the
    model's ``with_logical_constraint`` calls shard its activations."""
    def call(*args):
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(*args)

    def lower(*args):  # for ahead-of-time compilation (memory analysis in bench/)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted.lower(*args)

    call.lower = lower
    return call


def make_train_step(config: ml_collections.ConfigDict, model: TransformerLM,
                    optimizer: optax.GradientTransformation, mesh: Mesh, state_shardings):
    """The jitted ``(state, batch) -> (state, metrics)``; ``state`` is donated.

    ``batch``: dict of ``(batch_size, seq_len)`` int32 arrays (see data/packing.py), rows
    sharded over data × fsdp. The loss is the mean over the batch's target tokens. With
    ``grad_accum_steps = A`` the batch is scanned as A micro-batches whose gradients are summed
    before one update: the same update as the whole batch at once, in 1/A of the activation
    memory. ``metrics``: float32 scalars ``loss``, ``grad_norm`` (before clipping),
    ``learning_rate``, ``tokens``.
    """
    accum = config.grad_accum_steps
    schedule = learning_rate_schedule(config)
    micro_sharding = NamedSharding(mesh, PartitionSpec(None, BATCH_AXES, LENGTH_AXIS))

    def loss_sum(params, batch, dropout_key):
        losses = _token_losses(model, params, batch, deterministic=False, dropout_key=dropout_key)
        return losses.sum(), batch["loss_mask"].sum(dtype=jnp.float32)

    def train_step(state: TrainState, batch: dict):
        step_key = jax.random.fold_in(state.rng, state.step)
        gradient = jax.value_and_grad(loss_sum, has_aux=True)
        if accum == 1:
            (total, tokens), grads = gradient(state.params, batch, step_key)
        else:
            # Micro-batch m holds rows m, m + A, ...: each device keeps its own rows.
            micro = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
                x.reshape(-1, accum, x.shape[-1]).swapaxes(0, 1), micro_sharding), batch)

            def accumulate(carry, inputs):
                index, micro_batch = inputs
                (total, tokens), grads = gradient(state.params, micro_batch,
                                                  jax.random.fold_in(step_key, index))
                return jax.tree.map(jnp.add, carry, (total, tokens, grads)), None

            zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                     jax.tree.map(jnp.zeros_like, state.params))
            (total, tokens, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accum), micro))
        denominator = jnp.maximum(tokens, 1.0)
        grads = jax.tree.map(lambda g: g / denominator, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_state = state.replace(step=state.step + 1, opt_state=opt_state,
                                  params=optax.apply_updates(state.params, updates))
        metrics = {"loss": total / denominator, "grad_norm": optax.tree.norm(grads),
                   "learning_rate": schedule(state.step), "tokens": tokens}
        return new_state, metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    return _with_rules(jax.jit(train_step, in_shardings=(state_shardings, batch_sharding(mesh)),
                               out_shardings=(state_shardings, replicated), donate_argnums=0),
                       mesh, axis_rules(config))


def make_eval_step(config: ml_collections.ConfigDict, model: TransformerLM, mesh: Mesh,
                   params_shardings, tokenizer: Tokenizer):
    """The jitted ``(params, batch) -> sums``: float32 ``loss`` (nats), ``tokens``, ``bytes``
    (of text the targets stand for), and ``(seq_len,)`` ``loss_by_position`` /
    ``tokens_by_position`` (by each target's position in its document's context)."""
    byte_lengths = jnp.asarray(tokenizer.byte_lengths())

    def eval_step(params, batch):
        losses = _token_losses(model, params, batch)
        mask = batch["loss_mask"].astype(jnp.float32)
        positions = batch.get("positions")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(mask.shape[1]), mask.shape)
        by_position = lambda x: jnp.zeros(mask.shape[1], jnp.float32).at[positions].add(x)  # noqa: E731
        return {"loss": losses.sum(), "tokens": mask.sum(),
                "bytes": (byte_lengths[batch["targets"]] * mask).sum(),
                "loss_by_position": by_position(losses), "tokens_by_position": by_position(mask)}

    return _with_rules(jax.jit(eval_step, in_shardings=(params_shardings, batch_sharding(mesh)),
                               out_shardings=NamedSharding(mesh, PartitionSpec())),
                       mesh, axis_rules(config))


def _add_sums(totals: dict | None, sums: dict) -> dict:
    """``totals`` (numpy, None before the first batch) plus one batch's `make_eval_step`
    sums, read from the devices (this waits for them)."""
    sums = jax.tree.map(np.asarray, jax.device_get(sums))
    return sums if totals is None else jax.tree.map(np.add, totals, sums)


def check_documents_per_row(batch: dict, bound: int) -> None:
    """A one-line error where a row of ``batch`` (numpy) holds more than ``bound`` documents
    (0: no bound), the room that cuDNN's packed layout was compiled with."""
    if bound and "segment_ids" in batch:
        most = int(documents_per_row(batch["segment_ids"]).max())
        if most > bound:
            raise ValueError(f"a batch row holds {most} documents, more than "
                             f"model.max_documents_per_row={bound} (cuDNN's packed layout has "
                             f"that many slots): raise it (it may change on resume)")


def to_global_batch(batch: dict, sharding: NamedSharding, rows: slice | None = None) -> dict:
    """A dict of process-local numpy rows (``rows`` of ``batch``; default all) as global,
    sharded jax arrays."""
    return {k: jax.make_array_from_process_local_data(sharding, v if rows is None else v[rows])
            for k, v in batch.items()}


def process_rows(sharding: NamedSharding, batch_size: int) -> slice:
    """The rows of a ``(batch_size, ...)`` global batch that this process feeds: those its
    devices hold under ``sharding`` (`batch_sharding`). On P processes whose devices split the
    batch over data × fsdp, process p's rows are ``[p * B / P, (p + 1) * B / P)``; where
    processes share a batch shard (data × fsdp smaller than P), they feed the same rows.

    Raises a one-line ValueError where a process's devices hold rows that are not one such
    aligned block (a device order that the per-process data pipeline cannot feed).
    """
    # Shape (batch_size, length shards): one column per block of the sequence.
    length_axes = sharding.spec[1] if len(sharding.spec) > 1 else None
    length_axes = () if length_axes is None else (
        (length_axes,) if isinstance(length_axes, str) else tuple(length_axes))
    columns = math.prod(sharding.mesh.shape[axis] for axis in length_axes)
    indices = sharding.addressable_devices_indices_map((batch_size, columns)).values()
    if sum(b - a for a, b in {index[1].indices(columns)[:2] for index in indices}) != columns:
        raise ValueError(f"mesh {dict(sharding.mesh.shape)}: process {jax.process_index()}'s "
                         f"devices hold only part of each sequence; keep mesh.context within "
                         f"the devices of one process")
    # The distinct (start, stop) row ranges of this process's devices: equal-sized shards of
    # an even split, so they are one block exactly when their sizes add up to its span.
    held = sorted({index[0].indices(batch_size)[:2] for index in indices})
    start, stop = held[0][0], held[-1][1]
    contiguous = sum(end - begin for begin, end in held) == stop - start
    if not contiguous or batch_size % (stop - start) or start % (stop - start):
        raise ValueError(f"mesh {dict(sharding.mesh.shape)}: process {jax.process_index()}'s "
                         f"devices hold rows {held} of each batch of {batch_size}, not one "
                         f"aligned block; give each process whole data × fsdp shards")
    return slice(start, stop)


def evaluate_batches(eval_step, params, batches: Iterable[dict], sharding: NamedSharding,
                     batch_size: int, max_tokens: int = 0, document_bound: int = 0) -> dict:
    """Sums `make_eval_step` over ``batches`` (global batches, every process sees all rows);
    stops once ``max_tokens`` (0: no limit) targets are counted. ``document_bound``: see
    `check_documents_per_row`. Returns numpy sums plus ``loss`` (mean nats per token),
    ``perplexity``, ``bits_per_byte`` and ``num_tokens``."""
    totals, in_flight, targets = None, None, 0
    rows = process_rows(sharding, batch_size)
    for batch in batches:
        check_documents_per_row(batch, document_bound)
        sums = eval_step(params, to_global_batch(batch, sharding, rows))
        # Two batches in flight at most: the last one is read (on the host) once the next one
        # is on its way. With more queued, CPU processes sometimes deadlocked in their gloo
        # collectives; the batches stay independent programs, which can overlap.
        if in_flight is not None:
            totals = _add_sums(totals, in_flight)
        in_flight = sums
        targets += int(batch["loss_mask"].sum())
        if max_tokens and targets >= max_tokens:
            break
    if in_flight is not None:
        totals = _add_sums(totals, in_flight)
    if totals is None:
        raise ValueError("the evaluation data holds no batch")
    tokens = max(float(totals["tokens"]), 1.0)
    loss = float(totals["loss"]) / tokens
    return totals | {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
                     "bits_per_byte": float(totals["loss"]) / math.log(2)
                     / max(float(totals["bytes"]), 1.0),
                     "num_tokens": int(totals["tokens"])}


def sample_text(params, model_cfg: TransformerConfig, tokenizer: Tokenizer, prompt: str,
                num_tokens: int, seed: int, temperature: float = 0.8, top_k: int = 0,
                top_p: float = 0.95) -> str:
    """``prompt`` continued by up to ``num_tokens`` sampled tokens (one row), as text."""
    prompt_ids = tokenizer.encode(prompt)
    if not len(prompt_ids):
        prompt_ids = np.array([tokenizer.end_of_document_id], np.int32)
    tokens, lengths = generate(params, jnp.asarray(prompt_ids)[None], jax.random.PRNGKey(seed),
                               config=model_cfg, max_new_tokens=num_tokens,
                               temperature=temperature, top_k=top_k, top_p=top_p,
                               end_token=tokenizer.end_of_document_id)
    return prompt + tokenizer.decode(np.asarray(tokens[0, :int(lengths[0])]))


class LoadedRun(NamedTuple):
    """A trained run as `load_for_inference` restores it."""

    config: ml_collections.ConfigDict  # the training config, with the overrides applied
    model_config: TransformerConfig
    tokenizer: Tokenizer
    mesh: Mesh
    params: Any  # the model's float32 parameters, laid out on ``mesh``
    step: int  # the checkpoint's step


def load_for_inference(workdir: str, overrides: dict | None = None,
                       step: int | None = None) -> LoadedRun:
    """What evaluate.py and generate.py need from a run's checkpoint (``step``; default the
    latest).

    ``overrides``: flat ``{"data.source": ..., ...}`` applied to the saved config; the mesh is
    data-parallel over all devices unless ``mesh.*`` overrides say otherwise (the training
    mesh may need more devices than this machine has).
    """
    overrides = dict(overrides or {})
    fixed = [key for key in overrides if key.startswith(PARAMETER_FIELDS)]
    if fixed:
        raise ValueError(f"--config.{fixed[0]}: the checkpoint's parameters depend on it; it "
                         f"cannot change after training")
    checkpoints = Checkpoints(workdir, read_only=True)
    try:
        step, config = checkpoints.restore_config(step)
        overrides = {"mesh.data": -1, "mesh.fsdp": 1, "mesh.context": 1, "mesh.tensor": 1} \
            | overrides
        for key, value in overrides.items():
            parent, _, name = key.rpartition(".")
            target = config
            for part in filter(None, parent.split(".")):
                target = target[part]
            target[name] = value
        tokenizer = make_tokenizer(config.data, workdir)
        model_cfg = model_config(config, tokenizer)
        mesh = make_mesh(config)
        abstract, _ = create_train_state(config, TransformerLM(model_cfg), mesh,
                                         make_optimizer(config), abstract=True)
        params = checkpoints.restore(abstract, step).state.params
    finally:
        checkpoints.close()
    return LoadedRun(config, model_cfg, tokenizer, mesh, params, step)


# --- the training loop ------------------------------------------------------------------------

def peak_flops_per_device(config: ml_collections.ConfigDict) -> float:
    """The MFU denominator: ``config.peak_flops_per_device``, else the device kind's dense
    bf16 peak, else (CPU) a float32 matmul timed now."""
    if config.peak_flops_per_device:
        return float(config.peak_flops_per_device)
    kind = jax.devices()[0].device_kind.lower()
    for name, flops in (("h100", 989e12), ("h200", 989e12), ("b200", 2250e12), ("a100", 312e12),
                        ("v6 lite", 918e12), ("v6e", 918e12), ("v5 lite", 197e12),
                        ("v5e", 197e12), ("v5p", 459e12), ("v4", 275e12)):
        if name in kind:
            return flops
    x = jnp.ones((2048, 2048), jnp.float32)
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    start = time.perf_counter()
    for _ in range(5):
        matmul(x).block_until_ready()
    return 5 * 2 * 2048**3 / (time.perf_counter() - start)


class _StopSignal:
    """Turns SIGTERM/SIGINT into a request to save and stop after the current step (a second
    signal of the same kind acts as usual)."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signum
        signal.signal(signum, self._previous[signum])

    def requested(self) -> bool:
        """Whether any process received a signal (all processes must stop at the same step,
        since the checkpoint is saved by all of them together)."""
        if jax.process_count() == 1:
            return self.received is not None
        from jax.experimental import multihost_utils
        signals = multihost_utils.process_allgather(np.array(self.received or 0))
        if self.received is None and signals.max():
            self.received = int(signals.max())
        return self.received is not None

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinite for a line cut short by a killed run."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class _MetricsLog:
    """metrics.jsonl, TensorBoard events and the console, from process 0 only. A write of
    metrics.jsonl or a TensorBoard flush that fails (a full disk, a folder in the way) is a
    one-line ValueError; the checkpoints stay. (tensorboardX writes events on a thread of its
    own, whose failures it prints itself.)"""

    def __init__(self, workdir: str, resume_step: int, total_steps: int):
        self.enabled = jax.process_index() == 0
        self._path = os.path.join(workdir, "metrics.jsonl")
        self._writer = self._bar = None
        if not self.enabled:
            return
        with self._writing():
            # Steps after the checkpoint we resume from were logged by the interrupted run and
            # are about to be run again: drop them so that each step appears once. Through a
            # new file, so that a failed write leaves the old log whole.
            if os.path.exists(self._path):
                with open(self._path) as f:
                    kept = [line for line in f if _logged_step(line) <= resume_step]
                try:
                    with open(self._path + ".new", "w") as f:
                        f.writelines(kept)
                    os.replace(self._path + ".new", self._path)
                finally:
                    if os.path.exists(self._path + ".new"):
                        os.remove(self._path + ".new")
            from tensorboardX import SummaryWriter
            self._writer = SummaryWriter(workdir)
        if sys.stderr.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=total_steps, initial=resume_step, unit="step",
                             dynamic_ncols=True)

    @contextlib.contextmanager
    def _writing(self):
        try:
            yield
        except OSError as error:
            raise ValueError(f"writing the logs in {os.path.dirname(self._path)} failed "
                             f"({type(error).__name__}: {error.strerror or error}); the "
                             f"checkpoints saved so far are kept: free space (or fix the "
                             f"folder) and run the same command to resume") from None

    def write(self, step: int, scalars: dict, text: dict | None = None) -> None:
        if not self.enabled:
            return
        with self._writing():
            for name, value in scalars.items():
                self._writer.add_scalar(name, value, step)
            for name, value in (text or {}).items():
                self._writer.add_text(name, value, step)
            with open(self._path, "a") as f:
                f.write(json.dumps({"step": step, **scalars}) + "\n")
            self._writer.flush()

    def progress(self, step: int, summary: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.n = step
            self._bar.set_postfix_str(summary, refresh=True)
        else:
            print(f"step {step}: {summary}", flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            (self._bar.write if self._bar is not None else print)(text)

    def close(self, quietly: bool = False) -> None:
        """Closes the writers; ``quietly``: a failure raises nothing (another error is on its
        way out, which it must not replace)."""
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            try:
                with self._writing():
                    self._writer.close()
            except ValueError:
                if not quietly:
                    raise


def _check_resume_compatible(saved: ml_collections.ConfigDict,
                             config: ml_collections.ConfigDict, directory: str) -> None:
    for field in PARAMETER_FIELDS + DATA_ORDER_FIELDS:
        part, _, name = field.partition(".")
        # A data field that the checkpoint's code did not have yet meant its default.
        old = saved.get(part) if not name else saved.get(part, {}).get(
            name, _DATA_DEFAULTS.get(name) if part == "data" else None)
        new = config[part] if not name else config[part][name]
        old = old.to_dict() if isinstance(old, ml_collections.ConfigDict) else old
        new = new.to_dict() if isinstance(new, ml_collections.ConfigDict) else new
        if field == "model":
            # A field that the checkpoint's code did not have yet meant its default.
            old = _MODEL_DEFAULTS | (old or {})
            old, new = ({k: v for k, v in fields.items() if k not in _MODEL_FIELDS_FREE_ON_RESUME}
                        for fields in (old, new))
        old, new = json.loads(json.dumps(old)), json.loads(json.dumps(new))  # tuples as lists
        if old != new:
            if isinstance(old, dict):
                key = next(k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k))
                field, old, new = f"{field}.{key}", old.get(key), new.get(key)
            raise ValueError(f"{field}={new!r}, but the checkpoints in {directory} were trained "
                             f"with {old!r}: use another workdir, or the same value to resume")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (or resumes) in ``workdir`` until ``config.num_train_steps``; returns the final
    evaluation (see `evaluate_batches`), or ``{"stopped_at": step}`` after SIGTERM/SIGINT.
    Bad input raises a one-line ValueError."""
    validate_config(config)
    os.makedirs(workdir, exist_ok=True)
    with _StopSignal() as stop:
        checkpoints = Checkpoints(workdir, keep=config.keep_checkpoints)
        try:
            # Before anything is built in the workdir: a resumed run must match its checkpoints.
            if checkpoints.latest_step() is not None:
                _, saved_config = checkpoints.restore_config()
                _check_resume_compatible(saved_config, config, checkpoints.directory)
            return _train(config, workdir, checkpoints, stop)
        finally:
            checkpoints.wait()
            checkpoints.close()


def _train(config, workdir: str, checkpoints: Checkpoints, stop: _StopSignal) -> dict:
    # Data: the tokenizer decides the vocabulary; examples are cut to seq_len.
    tokenizer = make_tokenizer(config.data, workdir)
    model_cfg = model_config(config, tokenizer)
    train_examples = packed_examples(config.data, "train", tokenizer, config.seq_len,
                                     seed=config.seed)
    validation_examples = packed_examples(config.data, "validation", tokenizer, config.seq_len)

    # Devices, the sharded state and the steps.
    mesh = make_mesh(config)
    micro_batch = config.batch_size // config.grad_accum_steps
    check_batch_fits_mesh(micro_batch, mesh, "batch_size / grad_accum_steps")
    check_length_fits_mesh(config.seq_len, mesh, model_cfg.layer_chunk_size)
    model = TransformerLM(model_cfg)
    optimizer = make_optimizer(config)
    abstract, state_shardings = create_train_state(config, model, mesh, optimizer, abstract=True)
    data_state = None
    if checkpoints.latest_step() is not None:
        restored = checkpoints.restore(abstract)
        state, data_state = restored.state, restored.data_state
    else:
        state, _ = create_train_state(config, model, mesh, optimizer)
    start_step = int(state.step)
    train_step = make_train_step(config, model, optimizer, mesh, state_shardings)
    eval_step = make_eval_step(config, model, mesh, state_shardings.params, tokenizer)
    sharding = batch_sharding(mesh)
    document_bound = model_cfg.document_bound()  # rows checked where cuDNN's layout runs
    # This process reads only the rows its devices hold: of the batch cut into blocks of
    # `local` rows, the block that starts at rows.start.
    rows = process_rows(sharding, config.batch_size)
    local = rows.stop - rows.start
    batches = TrainBatches(train_examples, config.batch_size, config.seed,
                           process_index=rows.start // local,
                           process_count=config.batch_size // local,
                           prefetch=config.data.prefetch, state=data_state)

    flops_per_step = training_flops_per_token(model_cfg, config.seq_len) * config.batch_size \
        * config.seq_len
    peak_flops = peak_flops_per_device(config) * len(mesh.devices.flat)
    log = _MetricsLog(workdir, start_step, config.num_train_steps)
    log.message(f"{count_parameters(state.params):,} parameters on mesh "
                f"{dict(mesh.shape)}; " + (f"resuming at step {start_step}" if start_step
                                           else "starting") + f" in {workdir}")

    def run_evaluation(params, step: int, max_batches: int, write: bool = True) -> dict:
        # In micro-batches: the activations (and logits) of a whole batch may not fit at once.
        batches = validation_batches(validation_examples, micro_batch)
        if max_batches:
            batches = (b for _, b in zip(range(max_batches * config.grad_accum_steps), batches))
        result = evaluate_batches(eval_step, params, batches, sharding, micro_batch,
                                  document_bound=document_bound)
        if write:
            text = {}
            if config.sample_tokens:
                text["sample"] = sample_text(params, model_cfg, tokenizer,
                                             config.sample_prompt, config.sample_tokens,
                                             seed=config.seed + step)
            log.write(step, {f"eval/{k}": result[k] for k in ("loss", "perplexity",
                                                               "bits_per_byte")}, text)
        log.message(f"step {step}: eval loss {result['loss']:.4f}, perplexity "
                    f"{result['perplexity']:.3f}, {result['bits_per_byte']:.3f} bits/byte")
        if write and config.sample_tokens:  # what the model writes now, as the user sees it
            log.message("\n".join(f"  | {line}" for line in text["sample"].splitlines()))
        return result

    def save(step: int, state: TrainState) -> None:
        if checkpoints.latest_step() != step:
            checkpoints.save(step, state, batches.state(), config)

    meter = _ThroughputMeter(flops_per_step, peak_flops)
    failed = False
    try:
        for step in range(start_step + 1, config.num_train_steps + 1):
            batch = next(batches)
            check_documents_per_row(batch, document_bound)
            batch = to_global_batch(batch, sharding)
            computing = time.perf_counter()
            state, metrics = train_step(state, batch)
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            meter.add_step(time.perf_counter() - computing, metrics["tokens"])
            if not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"])):
                last = checkpoints.latest_step()
                raise ValueError(
                    f"non-finite loss ({metrics['loss']}) or gradient norm "
                    f"({metrics['grad_norm']}) at step {step}: stopped; the last good "
                    f"checkpoint ({'none' if last is None else f'step {last}'}) is kept "
                    f"in {checkpoints.directory}; lower learning_rate or grad_clip_norm")
            # The evaluation of a step is logged before its checkpoint exists, so a run killed
            # in between repeats both on resume instead of losing the evaluation.
            if (config.eval_every_steps and step % config.eval_every_steps == 0
                    and step != config.num_train_steps):
                evaluating = time.perf_counter()
                run_evaluation(state.params, step, config.eval_batches)
                meter.leave_out(time.perf_counter() - evaluating)  # not step overhead
            saved_seconds = None
            if step % config.checkpoint_every_steps == 0 or step == config.num_train_steps:
                saving = time.perf_counter()
                save(step, state)
                saved_seconds = time.perf_counter() - saving
            if step % config.log_every_steps == 0 or saved_seconds is not None:
                scalars = metrics | meter.report()
                if saved_seconds is not None:
                    scalars["checkpoint_save_seconds"] = saved_seconds
                log.write(step, scalars)
                log.progress(step, f"loss {metrics['loss']:.4f} "
                             f"{scalars['tokens_per_second']:,.0f} tok/s "
                             f"MFU {scalars['mfu']:.1%}")
            if stop.requested():
                save(step, state)
                checkpoints.wait()
                log.message(f"{signal.Signals(stop.received).name}: saved the checkpoint of "
                            f"step {step} in {checkpoints.directory}; run the same command to "
                            f"resume")
                return {"stopped_at": step}
        # A finished run run again evaluates without logging the evaluation a second time.
        return run_evaluation(state.params, int(state.step), config.eval_batches,
                              write=start_step < config.num_train_steps)
    except BaseException:
        failed = True
        raise
    finally:
        log.close(quietly=failed)


class _ThroughputMeter:
    """The logged throughput of the steps since the last `report`: wall time (evaluation left
    out), time in the jitted step, and tokens."""

    def __init__(self, flops_per_step: float, peak_flops: float):
        self._flops_per_step, self._peak_flops = flops_per_step, peak_flops
        self._restart()

    def _restart(self) -> None:
        self._since = time.perf_counter()
        self._steps, self._step_seconds, self._tokens = 0, 0.0, 0.0

    def add_step(self, step_seconds: float, tokens: float) -> None:
        self._steps += 1
        self._step_seconds += step_seconds
        self._tokens += tokens

    def leave_out(self, seconds: float) -> None:
        self._since += seconds

    def report(self) -> dict:
        """The rates since the last report (or the start); starts a new window (the time
        spent logging them counts in the next one)."""
        elapsed = time.perf_counter() - self._since
        seconds_per_step = elapsed / self._steps
        rates = {"tokens_per_second": self._tokens / elapsed,
                 "mfu": self._flops_per_step / seconds_per_step / self._peak_flops,
                 "seconds_per_step": seconds_per_step,
                 # Host time outside the jitted step: data, checkpoint calls, logging.
                 "overhead_fraction": 1.0 - self._step_seconds / elapsed}
        self._restart()
        return rates


def main(argv) -> None:
    del argv  # cli.parse_flags admits none
    logging.set_verbosity(logging.WARNING)  # orbax and jax log every save at INFO
    try:
        cli.start_distributed()
        train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)
    except ValueError as error:  # the user's input: one line, no traceback
        cli.exit_with_error(error)


if __name__ == "__main__":
    cli.define_config_file(cli.DEFAULT_CONFIG, "Training config file (a path, optionally with "
                           "':ARG' for its get_config).")
    flags.DEFINE_string("workdir", "runs/default", "Checkpoints, metrics and TensorBoard logs.")
    cli.run(main)
