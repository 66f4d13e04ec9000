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


def test_flops_count_three_matrices_in_either_gated_mlp():
    """GeGLU (Gemma's) is gated as SwiGLU is: gate, up and down; GELU has up and down."""
    flops = {activation: training_flops_per_token(small_config(activation=activation), 1024)
             for activation in ("swiglu", "geglu", "gelu")}
    config = small_config()
    assert flops["geglu"] == flops["swiglu"]
    assert flops["swiglu"] - flops["gelu"] == 6 * config.num_layers * config.d_model * \
        config.mlp_dim


def _xla_training_flops(config, length):
    """XLA's count of one forward+backward pass over ``length`` tokens."""
    tokens = random_tokens(batch=1, length=length) % config.vocab_size
    model, params = TransformerLM(config), nn.unbox(init_params(config, tokens))
    step = jax.jit(jax.grad(lambda p: model.apply({"params": p}, tokens).sum()))
    return step.lower(params).compile().cost_analysis()["flops"]


@pytest.mark.parametrize("fields", [dict(window_size=255), dict(window_size=127, num_kv_heads=1)])
def test_flops_of_real_windows_match_xla(fields):
    """Attention is about half of these models' FLOPs (a small width, a window of 128-256
    keys, 2048 tokens), so a missing or doubled attention term leaves the band. The blocked
    kernel also computes the masked scores of its diagonal blocks: XLA counts up to ~25% more."""
    config = small_config(num_layers=2, d_model=64, num_heads=4, mlp_dim=128, vocab_size=256,
                          **fields)
    ratio = _xla_training_flops(config, 2048) / (training_flops_per_token(config, 2048) * 2048)
    assert 1.0 < ratio < 1.3, ratio


@pytest.mark.parametrize("global_layers", [1, (1,)])
def test_flops_of_global_layers_match_xla_on_dense_attention(global_layers):
    """Dense attention (loop-free, so XLA's count is whole; the blocked kernel's global layers
    loop, and XLA counts a loop's body once) computes every key of every query: the causal
    half the estimate counts, plus the masked rest, added here."""
    n, width = 2048, 64
    config = small_config(num_layers=2, d_model=width, num_heads=4, mlp_dim=128, vocab_size=256,
                          window_size=255, global_layers=global_layers,
                          attention_implementation="dense")
    num_global = len(config.global_layer_indices)
    masked_keys = (num_global * (n - (n + 1) / 2)
                   + (2 - num_global) * (n - (config.window_size + 1)))
    expected = training_flops_per_token(config, n) * n + n * 12 * width * masked_keys
    ratio = _xla_training_flops(config, n) / expected
    assert 1.0 < ratio < 1.15, ratio  # softmax and other elementwise work on top
