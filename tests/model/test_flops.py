"""Parameter and FLOP counts (model/flops.py) against the model and XLA's cost analysis."""

import dataclasses

import flax.linen as nn
import jax
import pytest

from model.flops import count_parameters, training_flops_per_token
from model.transformer import TransformerLM
from tests.model.inputs import init_params, random_tokens, small_config


def test_parameter_count_and_flops_estimate_match_xla():
    config = small_config(num_layers=2, d_model=128, num_heads=4, mlp_dim=256, window_size=0,
                     vocab_size=512)
    tokens = random_tokens(batch=1, length=64) % 512
    model, params = TransformerLM(config), nn.unbox(init_params(config, tokens))
    per_layer = 4 * 128 * 128 + 3 * 128 * 256 + 2 * 128  # q k v out, swiglu, two RMSNorm scales
    assert count_parameters(params) == 2 * per_layer + 512 * 128 + 128
    step = jax.jit(jax.grad(lambda p: model.apply({"params": p}, tokens).sum()))
    xla_flops = step.lower(params).compile().cost_analysis()["flops"]
    estimate = training_flops_per_token(config, 64) * 64
    # XLA also counts elementwise work and the blocked kernel's masked scores.
    assert 0.9 < xla_flops / estimate < 1.35, (xla_flops, estimate)


def test_flops_count_global_layers_and_fewer_key_value_heads():
    base = small_config(num_layers=4, d_model=128, num_heads=4, mlp_dim=256, window_size=63)
    grouped = dataclasses.replace(base, num_kv_heads=1)
    # The k and v projections shrink by 4: 2 * 128 * (128 - 32) weights, 6 FLOPs each.
    assert training_flops_per_token(base, 1024) - training_flops_per_token(grouped, 1024) == \
        6 * 4 * 2 * 128 * 96
    with_global = dataclasses.replace(base, global_layers=(3,))
    # One layer's keys go from window + 1 = 64 to (1024 + 1) / 2 on average.
    assert training_flops_per_token(with_global, 1024) - training_flops_per_token(base, 1024) \
        == pytest.approx(12 * 128 * (1025 / 2 - 64))
