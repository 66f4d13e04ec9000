"""model/rope.py against transformers' own RoPE: the inverse frequencies and attention factor
of `ROPE_INIT_FUNCTIONS` (and Mistral's default), `apply_rotary` against a numpy copy of
Llama's ``apply_rotary_pos_emb``, the relative-position property, and one-line errors."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from model.rope import NO_SCALING, RopeScaling, apply_rotary, rope_frequencies

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.mistral.modeling_mistral import MistralRotaryEmbedding  # noqa: E402

YARN = {"rope_type": "yarn"}
SCALINGS = [
    {"rope_type": "default"},
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "linear", "factor": 32.0},
    YARN | {"factor": 2.0, "original_max_position_embeddings": 16},
    YARN | {"factor": 4.0, "original_max_position_embeddings": 16},
    YARN | {"factor": 8.0, "original_max_position_embeddings": 4096},
    YARN | {"factor": 32.0, "original_max_position_embeddings": 4096},
    YARN | {"factor": 4.0, "original_max_position_embeddings": 4096, "beta_fast": 8.0,
            "beta_slow": 2.0},
    YARN | {"factor": 4.0, "original_max_position_embeddings": 4096, "attention_factor": 0.75},
    YARN | {"factor": 8.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
            "mscale_all_dim": 0.5},
    YARN | {"factor": 8.0, "original_max_position_embeddings": 4096, "mscale": 0.7},
    YARN | {"factor": 4.0, "original_max_position_embeddings": 4096, "truncate": False},
    YARN | {"factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 16.0,
            "truncate": False},
    # Correction dims below 0 on both sides: the ramp's bounds meet (transformers' + 0.001).
    YARN | {"factor": 2.0, "original_max_position_embeddings": 4},
]
HEADS = 4


def _hf_config(head_dim, theta, scaling):
    return transformers.MistralConfig(
        hidden_size=HEADS * head_dim, num_attention_heads=HEADS, head_dim=head_dim,
        num_hidden_layers=1, intermediate_size=8, vocab_size=8, max_position_embeddings=4096,
        rope_parameters={"rope_theta": theta} | scaling)


def _hf_frequencies(head_dim, theta, scaling):
    """transformers' inverse frequencies (float32 numpy) and attention factor."""
    config = _hf_config(head_dim, theta, scaling)
    if scaling["rope_type"] == "default":
        inverse, factor = MistralRotaryEmbedding.compute_default_rope_parameters(config)
    else:
        inverse, factor = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](config)
    return inverse.numpy(), factor


def _ours(scaling):
    return RopeScaling.from_dict(scaling)


@pytest.mark.parametrize("head_dim,theta,scaling",
                         [(h, t, s) for (h, t), s in itertools.product(
                             [(16, 10_000.0), (64, 10_000.0), (16, 1e6), (64, 1e6)], SCALINGS)])
def test_frequencies_equal_transformers(head_dim, theta, scaling):
    expected, expected_factor = _hf_frequencies(head_dim, theta, scaling)
    inverse, factor = rope_frequencies(head_dim, theta, _ours(scaling))
    assert inverse.dtype == np.float32 and inverse.shape == (head_dim // 2,)
    np.testing.assert_allclose(inverse, expected, rtol=1e-6, atol=0)
    assert factor == pytest.approx(expected_factor, rel=1e-12)


def test_the_frequency_comparison_can_fail():
    """The scalings differ from one another where the test above compares them."""
    base, _ = rope_frequencies(64, 1e6)
    yarn, factor = rope_frequencies(64, 1e6, _ours(SCALINGS[6]))
    assert not np.allclose(base, yarn, rtol=1e-3) and factor > 1.3
    assert base[0] == yarn[0] and base[-1] / yarn[-1] == pytest.approx(32.0, rel=1e-6)


def _rotate_half(x):
    half = x.shape[-1] // 2
    return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _llama_rotary(x, positions, inverse, attention_factor):
    """Hugging Face Llama's rotary embedding in numpy: x ``(batch, seq, heads, head_dim)``,
    positions ``(batch, seq)``; angles in float32 as ``LlamaRotaryEmbedding.forward``."""
    freqs = positions.astype(np.float32)[..., None] * inverse.astype(np.float32)
    emb = np.concatenate([freqs, freqs], axis=-1).astype(np.float64)
    cos = (np.cos(emb) * attention_factor)[:, :, None, :]
    sin = (np.sin(emb) * attention_factor)[:, :, None, :]
    x = x.astype(np.float64)
    return x * cos + _rotate_half(x) * sin


def test_numpy_reference_equals_transformers_apply_rotary_pos_emb():
    """The reference below is Llama's: checked once against transformers' own function."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    rng = np.random.RandomState(0)
    q, k = rng.randn(2, 2, 5, 3, 16).astype(np.float32)
    positions = np.array([[0, 1, 7, 300, 9000], [4, 5, 6, 7, 8]])
    inverse, factor = _hf_frequencies(16, 10_000.0, SCALINGS[4])
    freqs = torch.tensor(positions, dtype=torch.float32)[..., None] * torch.tensor(inverse)
    emb = torch.cat([freqs, freqs], -1)
    hq, hk = apply_rotary_pos_emb(torch.tensor(q).transpose(1, 2), torch.tensor(k).transpose(1, 2),
                                  emb.cos() * factor, emb.sin() * factor)
    np.testing.assert_allclose(_llama_rotary(q, positions, inverse, factor),
                               hq.transpose(1, 2).numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_llama_rotary(k, positions, inverse, factor),
                               hk.transpose(1, 2).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_dim,theta,scaling", [
    (16, 10_000.0, SCALINGS[0]),
    (64, 1e6, SCALINGS[0]),
    (64, 10_000.0, SCALINGS[1]),
    (64, 1e6, SCALINGS[6]),
    (16, 10_000.0, SCALINGS[9]),
])
def test_apply_rotary_equals_llama_up_to_100k_positions(head_dim, theta, scaling):
    rng = np.random.RandomState(1)
    x = rng.randn(2, 6, 3, head_dim).astype(np.float32)
    positions = np.array([[0, 1, 2, 511, 4097, 100_000], [5, 99_999, 31, 65_536, 8, 77_777]])
    inverse, factor = _hf_frequencies(head_dim, theta, scaling)
    expected = _llama_rotary(x, positions, inverse, factor)
    ours = np.asarray(apply_rotary(jnp.asarray(x), jnp.asarray(positions), theta,
                                   _ours(scaling)))
    assert ours.dtype == np.float32
    # float32 angles: each inverse frequency within a few ulps of transformers' (numpy's and
    # torch's float32 pow round differently), so an angle within ~4e-7 of itself.
    angles = np.concatenate([positions[..., None] * inverse] * 2, axis=-1)[:, :, None, :]
    tolerance = factor * (np.abs(x) + np.abs(_rotate_half(x))) * (4e-7 * angles + 2e-6)
    error = np.abs(ours - expected)
    assert np.all(error <= tolerance), float((error / tolerance).max())


def test_apply_rotary_keeps_bfloat16_and_broadcasts_positions():
    x = np.random.RandomState(2).randn(2, 4, 2, 8).astype(np.float32)
    positions = np.arange(4)
    inverse, _ = _hf_frequencies(8, 10_000.0, SCALINGS[0])
    expected = _llama_rotary(x, np.stack([positions, positions]), inverse, 1.0)
    ours = apply_rotary(jnp.asarray(x, jnp.bfloat16), jnp.asarray(positions), 10_000.0)
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(ours, np.float32), expected, rtol=0, atol=3e-2)


@pytest.mark.parametrize("scaling", [SCALINGS[0], SCALINGS[6]])
@pytest.mark.parametrize("shift", [1, 37, 3000])
def test_scores_depend_on_relative_positions_only(scaling, shift):
    rng = np.random.RandomState(3)
    q, k = (jnp.asarray(rng.randn(1, 8, 2, 32).astype(np.float32)) for _ in range(2))
    positions = jnp.asarray([[0, 3, 10, 100, 250, 400, 777, 1000]])
    scaling = _ours(scaling)

    def scores(offset):
        rq = apply_rotary(q, positions + offset, 10_000.0, scaling)
        rk = apply_rotary(k, positions[:, ::-1] + offset, 10_000.0, scaling)
        return np.asarray(jnp.einsum("bqhd,bkhd->bhqk", rq, rk))

    base, shifted = scores(0), scores(shift)
    scale = float(jnp.linalg.norm(q, axis=-1).max() * jnp.linalg.norm(k, axis=-1).max())
    np.testing.assert_allclose(shifted, base, rtol=0, atol=1e-5 * scale * (1 + shift / 100))
    # The scores do depend on the positions themselves (the check above can fail).
    unshifted_k = np.asarray(jnp.einsum("bqhd,bkhd->bhqk",
                                        apply_rotary(q, positions + shift, 10_000.0, scaling),
                                        apply_rotary(k, positions[:, ::-1], 10_000.0, scaling)))
    assert np.abs(unshifted_k - base).max() > 1e-2 * scale


def test_no_scaling_is_the_default():
    assert RopeScaling.from_dict(None) == RopeScaling.from_dict({}) == NO_SCALING


@pytest.mark.parametrize("values,message", [
    ({"bogus": 1}, "model.rope_scaling.bogus: unknown field; expected one of"),
    ({"rope_type": "dynamic", "factor": 2.0},
     "model.rope_scaling.rope_type='dynamic': expected one of ['default', 'linear', 'yarn']"),
    ({"rope_type": "linear", "factor": 0.5},
     "model.rope_scaling.factor=0.5: expected a number >= 1"),
    ({"rope_type": "yarn", "factor": 2.0},
     "model.rope_scaling.rope_type='yarn' needs model.rope_scaling."
     "original_max_position_embeddings"),
    ({"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16,
      "truncate": "yes"}, "model.rope_scaling.truncate='yes': expected a bool"),
])
def test_bad_scalings_are_one_line_errors(values, message):
    with pytest.raises(ValueError) as error:
        RopeScaling.from_dict(values)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
