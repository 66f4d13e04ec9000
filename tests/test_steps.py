"""steps.py: the sharded train step equals the one-device step on several meshes (data,
fsdp, tensor, context parallelism, gradient accumulation); a state restores under another
mesh; the learning-rate schedule."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

import run_config
import sharding
import steps
from checkpoints import Checkpoints
from data import ByteTokenizer
from model import TransformerConfig, TransformerLM
from steps import setup_training
from tests.training import tiny_config

EMBED = ("fsdp", "context")  # the mesh axes of a parameter's embed axis (ZeRO-3)


def _sharding_config(cache_dir, **overrides):
    # Sizes divisible by every mesh axis below (heads 4, embed 64, mlp 128, vocab 384).
    return tiny_config(cache_dir, **{"model.d_model": 64, "model.num_heads": 4,
                                     "model.mlp_dim": 128, "model.dropout_rate": 0.1,
                                     **overrides})


def _run_steps(config, mesh_shape, batches, devices=None, context=1):
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh_shape
    config.mesh.context = context
    training = setup_training(
        config, TransformerConfig.from_config(config.model.to_dict(), vocab_size=384), devices)
    state, losses = training.init_state(), []
    for batch in batches:
        global_batch = sharding.to_global_batch(batch, sharding.batch_sharding(training.mesh))
        state, metrics = training.train_step(state, global_batch)
        losses.append(float(metrics["loss"]))
    return state, losses


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    from data import TrainBatches, make_tokenizer, packed_examples

    config = tiny_config(tmp_path_factory.mktemp("cache"))
    examples = packed_examples(config.data, "train", make_tokenizer(config.data), config.seq_len)
    iterator = TrainBatches(examples, config.batch_size, seed=0, process_index=0, process_count=1)
    return [next(iterator) for _ in range(3)]


@pytest.fixture(scope="module")
def one_device_run(batches, tmp_path_factory):
    config = _sharding_config(tmp_path_factory.mktemp("cache"))
    state, losses = _run_steps(config, (1, 1, 1), batches, jax.devices()[:1])
    return jax.tree.map(np.asarray, state.params), losses


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4), (2, 1, 4)])
def test_sharded_step_matches_one_device(mesh_shape, batches, one_device_run, tmp_path):
    assert len(jax.devices()) == 8
    state, losses = _run_steps(_sharding_config(tmp_path), mesh_shape, batches)
    expected_params, expected_losses = one_device_run
    np.testing.assert_allclose(losses, expected_losses, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected_params), strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-5)

    # The parameters and AdamW moments are sharded as configs/default.py's rules say.
    data, fsdp, tensor = mesh_shape
    embedding = state.params["embed"]["embedding"]  # (vocab, embed)
    assert embedding.sharding.spec == PartitionSpec("tensor", EMBED)
    assert embedding.addressable_shards[0].data.shape == (384 // tensor, 64 // fsdp)
    query = state.params["layer_0"]["attention"]["query"]["kernel"]  # (embed, heads, kv)
    assert query.sharding.spec == PartitionSpec(EMBED, "tensor", None)
    assert query.addressable_shards[0].data.shape == (64 // fsdp, 4 // tensor, 16)
    down = state.params["layer_0"]["mlp"]["down"]["kernel"]  # (mlp, embed)
    assert down.sharding.spec == PartitionSpec("tensor", EMBED)
    adam = state.opt_state[1][0]  # clip_by_global_norm, then adamw's ScaleByAdamState
    assert adam.mu["embed"]["embedding"].sharding.spec == PartitionSpec("tensor", EMBED)


@pytest.fixture(scope="module")
def document_batches(batches):
    """``batches`` cut into documents that start near the boundaries of the context blocks
    below (16, 32, 48) and within a window of them: segment ids and positions as
    data/packing.py makes them."""
    position = np.arange(batches[0]["inputs"].shape[1])
    segment_ids = 1 + sum(position >= start for start in (14, 31, 33, 50))
    starts = np.maximum.accumulate(np.where(np.diff(segment_ids, prepend=0), position, 0))
    return [b | {"segment_ids": np.broadcast_to(segment_ids, b["inputs"].shape).astype(np.int32),
                 "positions": np.broadcast_to(position - starts, b["inputs"].shape)
                 .astype(np.int32)} for b in batches]


@pytest.fixture(scope="module")
def one_device_documents_run(document_batches, tmp_path_factory):
    config = _sharding_config(tmp_path_factory.mktemp("cache"))
    state, losses = _run_steps(config, (1, 1, 1), document_batches, jax.devices()[:1])
    return jax.tree.map(np.asarray, state.params), losses


@pytest.mark.parametrize("mesh_shape, context", [
    ((1, 1, 1), 2), ((1, 1, 1), 4), ((1, 1, 1), 8), ((2, 1, 2), 2), ((1, 2, 1), 4)])
def test_context_parallel_step_matches_one_device(mesh_shape, context, document_batches,
                                                  one_device_documents_run, tmp_path):
    # Blocks of 32, 16 and 8 positions: the window of 16 spans one, one and two neighbours.
    devices = jax.devices()[:np.prod(mesh_shape) * context]
    state, losses = _run_steps(_sharding_config(tmp_path), mesh_shape, document_batches, devices,
                               context=context)
    expected_params, expected_losses = one_device_documents_run
    np.testing.assert_allclose(losses, expected_losses, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected_params), strict=True):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-5)
    # Parameters shard embed over the context devices too (ZeRO-3).
    embedding = state.params["embed"]["embedding"]  # (vocab, embed)
    fsdp, tensor = mesh_shape[1:]
    assert embedding.addressable_shards[0].data.shape == (384 // tensor, 64 // fsdp // context)


def test_gradient_accumulation_matches_the_whole_batch(batches, tmp_path):
    # Without dropout: its draws differ per micro-batch.
    whole = _sharding_config(tmp_path, **{"model.dropout_rate": 0.0})
    accumulated = _sharding_config(tmp_path, grad_accum_steps=4, **{"model.dropout_rate": 0.0})
    state_a, losses_a = _run_steps(whole, (1, 1, 1), batches, jax.devices()[:1])
    state_b, losses_b = _run_steps(accumulated, (2, 1, 1), batches, jax.devices()[:2])
    np.testing.assert_allclose(losses_b, losses_a, rtol=2e-5)
    for a, b in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("accum", [1, 2])
def test_the_loss_is_the_weighted_mean_and_tokens_count_targets(accum, batches, tmp_path):
    """Weighted pass-key answers (data.passkey_answer_weight): the loss is the loss_mask-weighted
    mean of the per-token losses of the model's own forward pass; tokens/s and MFU count the
    targets (the mask's non-zeros), not their weights."""
    config = _sharding_config(tmp_path, grad_accum_steps=accum, **{"model.dropout_rate": 0.0})
    batch = dict(batches[0])
    weights = np.random.default_rng(0).choice([0.0, 1.0, 16.0], batch["loss_mask"].shape)
    batch["loss_mask"] = (batch["loss_mask"] * weights).astype(np.float32)
    model_config = TransformerConfig.from_config(config.model.to_dict(), vocab_size=384)
    training = setup_training(config, model_config, jax.devices()[:accum])
    state = training.init_state()
    losses = TransformerLM(model_config).apply({"params": state.params}, batch["inputs"],
                                               targets=batch["targets"])
    expected = float((np.asarray(losses) * batch["loss_mask"]).sum() / batch["loss_mask"].sum())
    _, metrics = training.train_step(
        state, sharding.to_global_batch(batch, sharding.batch_sharding(training.mesh)))
    np.testing.assert_allclose(float(metrics["loss"]), expected, rtol=1e-5)
    assert float(metrics["tokens"]) == np.count_nonzero(batch["loss_mask"])


def test_a_checkpoint_restores_under_another_mesh(tmp_path, batches):
    config = _sharding_config(tmp_path / "cache")
    state, _ = _run_steps(config, (2, 4, 1), batches[:1])
    checkpoints = Checkpoints(str(tmp_path / "run"))
    checkpoints.save(1, state, {"next_index": 8}, config, ByteTokenizer())
    checkpoints.wait()

    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 2, 4
    mesh = sharding.make_mesh(config)
    model = TransformerLM(TransformerConfig.from_config(config.model.to_dict(), vocab_size=384))
    abstract, _ = steps.create_train_state(config, model, mesh, steps.make_optimizer(config),
                                           abstract=True)
    restored = checkpoints.restore(abstract)
    assert restored.step == 1 and restored.data_state == {"next_index": 8}
    embedding = restored.state.params["embed"]["embedding"]
    assert embedding.sharding.spec == PartitionSpec("tensor", EMBED)
    assert embedding.sharding.mesh.shape == {"data": 1, "fsdp": 2, "context": 1, "tensor": 4}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_learning_rate_schedule_warms_up_then_decays():
    config = tiny_config("unused", num_train_steps=100, warmup_steps=10, learning_rate=1.0,
                         min_learning_rate_ratio=0.1, decay_schedule="cosine")
    schedule = steps.learning_rate_schedule(config)
    assert float(schedule(0)) == 0.0 and float(schedule(10)) == pytest.approx(1.0)
    assert float(schedule(100)) == pytest.approx(0.1)
    assert float(schedule(50)) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 40 / 90)))
    config.decay_schedule = "linear"
    schedule = steps.learning_rate_schedule(config)
    assert float(schedule(0)) == 0.0 and float(schedule(5)) == pytest.approx(0.5)
    assert float(schedule(10)) == pytest.approx(1.0) and float(schedule(100)) == pytest.approx(0.1)
    assert float(schedule(55)) == pytest.approx(1.0 - 0.9 * 45 / 90)
    config.decay_schedule = "step"
    with pytest.raises(ValueError, match=r"^decay_schedule='step': expected one of \['cosine', "
                                         r"'linear'\]$"):
        run_config.validate_config(config)
