"""The training state, the optimizer and the jitted train and eval steps, laid out on a mesh.

`setup_training` builds them all (mesh → model → optimizer → state shardings → step) for
train.py, the benchmarks and the tests alike; `make_eval_step` adds the evaluation step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import sharding
from data.tokenizers import Tokenizer
from model import TransformerConfig, TransformerLM

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
    Raises a one-line `UserError` for a parameter that its mesh axes do not divide.
    """
    def initial_state(seed):
        init_key, dropout_key = jax.random.split(jax.random.PRNGKey(seed))
        params = model.init(init_key, jnp.zeros((1, 1), jnp.int32))["params"]
        return _fresh_state(params, optimizer, dropout_key)

    boxed = jax.eval_shape(initial_state, config.seed)
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh,
                                            sharding.axis_rules(config))
    sharding.check_shardings_divide(nn.unbox(boxed.params), shardings.params)
    if abstract:
        shapes = nn.unbox(boxed)
        return jax.tree.map(lambda s, leaf_sharding: jax.ShapeDtypeStruct(
            s.shape, s.dtype, sharding=leaf_sharding), shapes, shardings), shardings
    init = jax.jit(lambda seed: nn.unbox(initial_state(seed)), static_argnums=0,
                   out_shardings=shardings)
    return init(config.seed), shardings


def _fresh_state(params, optimizer: optax.GradientTransformation,
                 dropout_key: jax.Array) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params), rng=dropout_key)


def token_losses(model: TransformerLM, params, batch: dict, deterministic: bool = True,
                 dropout_key: jax.Array | None = None) -> jax.Array:
    """Cross-entropy of each target, ``(batch, seq_len)`` float32 (0 where loss_mask is 0)."""
    rngs = None if deterministic else {"dropout": dropout_key}
    # The model computes the losses in chunks: the (tokens × vocabulary) logits never exist.
    losses = model.apply({"params": params}, batch["inputs"], segment_ids=batch.get("segment_ids"),
                         positions=batch.get("positions"), deterministic=deterministic,
                         targets=batch["targets"], rngs=rngs)
    return losses * batch["loss_mask"]


def make_train_step(config: ml_collections.ConfigDict, model: TransformerLM,
                    optimizer: optax.GradientTransformation, mesh: Mesh, state_shardings):
    """The jitted ``(state, batch) -> (state, metrics)``; ``state`` is donated.

    ``batch``: dict of ``(batch_size, seq_len)`` int32 arrays (see data/packing.py), rows
    sharded over data × fsdp. The loss is the mean over the batch's target tokens, weighted by
    ``loss_mask`` (0 on padding, 1 elsewhere but for weighted pass-key answers). With
    ``grad_accum_steps = A`` the batch is scanned as A micro-batches whose gradients are summed
    before one update: the same update as the whole batch at once, in 1/A of the activation
    memory. ``metrics``: float32 scalars ``loss``, ``grad_norm`` (before clipping),
    ``learning_rate``, ``tokens`` (the targets counted, whatever their weight: what tokens/s
    and MFU count).
    """
    accum = config.grad_accum_steps
    schedule = learning_rate_schedule(config)
    micro_sharding = NamedSharding(mesh, PartitionSpec(None, sharding.BATCH_AXES,
                                                       sharding.LENGTH_AXIS))

    def loss_sum(params, batch, dropout_key):
        losses = token_losses(model, params, batch, deterministic=False, dropout_key=dropout_key)
        return losses.sum(), batch["loss_mask"].sum(dtype=jnp.float32)  # the weights' sum

    def train_step(state: TrainState, batch: dict):
        step_key = jax.random.fold_in(state.rng, state.step)
        gradient = jax.value_and_grad(loss_sum, has_aux=True)
        if accum == 1:
            (total, weights), grads = gradient(state.params, batch, step_key)
        else:
            # Micro-batch m holds rows m, m + A, ...: each device keeps its own rows.
            micro = jax.tree.map(lambda x: jax.lax.with_sharding_constraint(
                x.reshape(-1, accum, x.shape[-1]).swapaxes(0, 1), micro_sharding), batch)

            def accumulate(carry, inputs):
                index, micro_batch = inputs
                (total, weights), grads = gradient(state.params, micro_batch,
                                                   jax.random.fold_in(step_key, index))
                return jax.tree.map(jnp.add, carry, (total, weights, grads)), None

            zeros = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                     jax.tree.map(jnp.zeros_like, state.params))
            (total, weights, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accum), micro))
        denominator = jnp.maximum(weights, 1.0)
        grads = jax.tree.map(lambda g: g / denominator, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new_state = state.replace(step=state.step + 1, opt_state=opt_state,
                                  params=optax.apply_updates(state.params, updates))
        metrics = {"loss": total / denominator, "grad_norm": optax.tree.norm(grads),
                   "learning_rate": schedule(state.step),
                   "tokens": jnp.count_nonzero(batch["loss_mask"]).astype(jnp.float32)}
        return new_state, metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(train_step, in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                     out_shardings=(state_shardings, replicated), donate_argnums=0)
    return sharding.with_rules(jitted, mesh, sharding.axis_rules(config))


def make_eval_step(config: ml_collections.ConfigDict, model: TransformerLM, mesh: Mesh,
                   params_shardings, tokenizer: Tokenizer):
    """The jitted ``(params, batch) -> sums``: float32 ``loss`` (nats), ``tokens``, ``bytes``
    (of text the targets stand for), and ``(seq_len,)`` ``loss_by_position`` /
    ``tokens_by_position`` (by each target's position in its document's context)."""
    byte_lengths = jnp.asarray(tokenizer.byte_lengths())

    def eval_step(params, batch):
        losses = token_losses(model, params, batch)
        mask = batch["loss_mask"].astype(jnp.float32)
        positions = batch.get("positions")
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(mask.shape[1]), mask.shape)
        by_position = lambda x: jnp.zeros(mask.shape[1], jnp.float32).at[positions].add(x)  # noqa: E731
        return {"loss": losses.sum(), "tokens": mask.sum(),
                "bytes": (byte_lengths[batch["targets"]] * mask).sum(),
                "loss_by_position": by_position(losses), "tokens_by_position": by_position(mask)}

    jitted = jax.jit(eval_step, in_shardings=(params_shardings, sharding.batch_sharding(mesh)),
                     out_shardings=NamedSharding(mesh, PartitionSpec()))
    return sharding.with_rules(jitted, mesh, sharding.axis_rules(config))


class TrainSetup(NamedTuple):
    """A model and its optimizer laid out on a mesh, with the jitted train step: what
    `setup_training` builds."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    model: TransformerLM
    optimizer: optax.GradientTransformation
    abstract_state: TrainState  # jax.ShapeDtypeStructs with shardings: a restore target
    state_shardings: TrainState  # the NamedSharding of each array of the state
    train_step: Callable  # see `make_train_step`

    def init_state(self, params=None) -> TrainState:
        """A fresh state from ``config.seed`` (the same numbers on any mesh); given ``params``
        (laid out as ``abstract_state.params``, e.g. by `init_from.initial_params`), those
        parameters (donated) with a fresh optimizer state at step 0."""
        if params is None:
            return create_train_state(self.config, self.model, self.mesh, self.optimizer)[0]
        dropout_key = jax.random.split(jax.random.PRNGKey(self.config.seed))[1]
        fresh = jax.jit(lambda p: _fresh_state(p, self.optimizer, dropout_key),
                        out_shardings=self.state_shardings, donate_argnums=0)
        return fresh(params)


def setup_training(config: ml_collections.ConfigDict, model_config: TransformerConfig,
                   devices: list | None = None) -> TrainSetup:
    """The mesh of ``config.mesh`` over ``devices`` (default all), the model, the optimizer,
    the state's shardings and the train step. Raises a one-line `UserError` where the mesh
    cannot split the (micro-)batch, the sequence or a parameter."""
    mesh = sharding.make_mesh(config, devices)
    sharding.check_batch_fits_mesh(config.batch_size // config.grad_accum_steps, mesh,
                                   "batch_size / grad_accum_steps")
    sharding.check_length_fits_mesh(config.seq_len, mesh, model_config.layer_chunk_size,
                                    model_config.window_size)
    model = TransformerLM(model_config)
    optimizer = make_optimizer(config)
    abstract, shardings = create_train_state(config, model, mesh, optimizer, abstract=True)
    train_step = make_train_step(config, model, optimizer, mesh, shardings)
    return TrainSetup(config, mesh, model, optimizer, abstract, shardings, train_step)
