"""Every config under configs/ builds a valid model, mesh and optimizer."""

import glob
import os

import pytest

import run_config
import sharding
from model import TransformerConfig, training_flops_per_token
from tests.training import ROOT


def _configs():
    from ml_collections import config_flags  # noqa: F401  (the loader train.py uses)
    from configs import default, long_context_cpu, pg19, tiny

    yield "default", default.get_config()
    yield "tiny", tiny.get_config()
    yield "long_context_cpu", long_context_cpu.get_config()
    for context in ("32768", "65536", "131072"):
        yield f"pg19:{context}", pg19.get_config(context)


def test_every_config_file_is_covered():
    files = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))}
    assert files - {"__init__", "data"} == {name.split(":")[0] for name, _ in _configs()}


@pytest.mark.parametrize("name, config", list(_configs()), ids=lambda x: x if isinstance(x, str) else "")
def test_config_is_valid(name, config):
    run_config.validate_config(config)
    model = TransformerConfig.from_config(config.model.to_dict(), vocab_size=384)
    assert sharding.axis_rules(config)
    assert config.seq_len >= 1024 or name == "tiny"  # long context, or a smoke test
    assert training_flops_per_token(model, config.seq_len) > 0
    config.mesh.data = config.mesh.fsdp = 1
    config.mesh.tensor = -1
    assert sharding.make_mesh(config).shape["tensor"] == 8


@pytest.mark.parametrize("name, config", list(_configs()), ids=lambda x: x if isinstance(x, str) else "")
def test_config_builds_and_lowers_its_train_step(name, config):
    """Each preset's model, sharded state and train step, traced and lowered on as many
    simulated devices (up to 8) as its batch splits over: what train.py builds, without
    running it (nothing is allocated)."""
    import jax
    import jax.numpy as jnp

    from data.tokenizers import padded_vocab_size
    from steps import setup_training

    vocab = (padded_vocab_size(config.data.sentencepiece_vocab_size)
             if config.data.tokenizer == "sentencepiece" else 384)
    model = TransformerConfig.from_config(config.model.to_dict(), vocab_size=vocab)
    rows = config.batch_size // config.grad_accum_steps
    devices = jax.devices()[:max(d for d in range(1, 9) if rows % d == 0)]
    training = setup_training(config, model, devices)
    batch_sharding = sharding.batch_sharding(training.mesh)
    batch = {field: jax.ShapeDtypeStruct((config.batch_size, config.seq_len), dtype,
                                         sharding=batch_sharding)
             for field, dtype in (("inputs", jnp.int32), ("targets", jnp.int32),
                                  ("loss_mask", jnp.float32), ("segment_ids", jnp.int32),
                                  ("positions", jnp.int32))}
    state, metrics = training.train_step.lower(training.abstract_state, batch).out_info
    assert jax.tree.map(lambda s: (s.shape, s.dtype), state) == jax.tree.map(
        lambda s: (s.shape, s.dtype), training.abstract_state)
    assert set(metrics) == {"loss", "grad_norm", "learning_rate", "tokens"}
