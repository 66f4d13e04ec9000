"""The ``"cudnn"`` implementation (model/kernels/cudnn.py): what it rejects, its packed layout
of documents (on any backend), and on NVIDIA GPUs its results against the blocked kernel."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from errors import UserError
from model import local_attention
from model.attention import resolve_implementation
from model.kernels.cudnn import packed_layout
from tests.model.inputs import DOCUMENT_LENGTHS, document_ids, qkv


def test_cudnn_implementation_rejects_what_it_cannot_compute():
    q, k, v = qkv((1, 2, 64, 16), jnp.bfloat16)
    with pytest.raises(ValueError, match="implementation='cudnn' cannot compute "
                                         "window_size_right=3 .*segment_ids without max_segments"):
        local_attention(q, k, v, window_size_left=8, window_size_right=3,
                        segment_ids=jnp.zeros((1, 1, 64), jnp.int32), implementation="cudnn")
    with pytest.raises(ValueError, match="'cudnn' cannot compute rel_pos_emb, dropout"):
        local_attention(q, k, v, window_size_left=8, window_size_right=0,
                        rel_pos_emb=jnp.ones((9, 16)), dropout_rate=0.1,
                        dropout_rng=jax.random.key(0), implementation="cudnn")
    # Gemma 2's logit soft-cap: jax's cuDNN attention has none (auto picks xla instead).
    with pytest.raises(UserError, match=r"'cudnn' cannot compute logit_soft_cap=50\.0 "
                                         r"\(jax's cuDNN attention has no cap\)") as error:
        local_attention(q, k, v, window_size_left=8, window_size_right=0, logit_soft_cap=50,
                        implementation="cudnn")
    assert "\n" not in str(error.value)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="implementation='cudnn' needs an NVIDIA GPU"):
            local_attention(q, k, v, window_size_left=8, window_size_right=0,
                            segment_ids=jnp.zeros((1, 1, 64), jnp.int32), max_segments=4,
                            implementation="cudnn")


def _packed_sequences(lengths, offsets, seq_len):
    """int ``(batch, seq_len)``: the slot of cuDNN's packed layout that each position is in
    (-1: none), computed with jnp from the layout (traceable)."""
    position = jnp.arange(seq_len)
    inside = ((position[None, None] >= offsets[:, :-1, None])
              & (position[None, None] < offsets[:, :-1, None] + lengths[..., None])
              & (lengths[..., None] > 0))
    return jnp.where(inside.any(1), jnp.argmax(inside, axis=1), -1)


def _packed_visibility(lengths, offsets, seq_len, sliding_window_length):
    """bool ``(batch, 1, seq_len, seq_len)``: what cuDNN's packed layout with its causal
    sliding window of ``sliding_window_length`` positions (the query's own included) lets a
    query see: the keys of its own packed sequence, causally, in the window."""
    packed = _packed_sequences(lengths, offsets, seq_len)
    position = jnp.arange(seq_len)
    return ((packed[:, None, :, None] == packed[:, None, None, :])
            & (packed[:, None, :, None] >= 0)
            & (position[None, :] <= position[:, None])
            & (position[None, :] > position[:, None] - sliding_window_length))


@pytest.mark.parametrize("version", [(0, 10, 2), (0, 11, 1)])
def test_grouped_heads_with_documents_are_repeated_for_a_jax_that_strides_them_wrong(
        monkeypatch, version):
    """jax before 0.11.1 offsets packed keys and values by the query heads: there, grouped
    k/v heads reach cuDNN repeated to the query heads (and the attention is the grouped one);
    on a fixed jax they go as they are. cuDNN's packed call is replaced by its semantics
    (`_packed_visibility`), so this runs on any backend with a faked jax version."""
    from jax._src.cudnn import fused_attention_stablehlo

    from model.kernels import cudnn

    heads_given = []

    def packed_attention(q, k, v, bias, mask, q_seqlen, kv_seqlen, q_offsets, kv_offsets, *,
                         scale, mask_type, qkv_layout, sliding_window_length):
        assert qkv_layout == "BTNH" and bias is None and mask is None
        heads_given.append(k.shape[2])
        visible = _packed_visibility(q_seqlen, q_offsets, q.shape[1], sliding_window_length)
        return jax.nn.dot_product_attention(q, k, v, mask=visible, scale=scale)

    monkeypatch.setattr(jax, "__version_info__", version)
    monkeypatch.setattr(cudnn, "target_backend", lambda: "gpu")
    monkeypatch.setattr(fused_attention_stablehlo, "dot_product_attention", packed_attention)
    q = qkv((3, 4, 300, 16), jnp.bfloat16, seed=5)[0]
    k, v = qkv((3, 2, 300, 16), jnp.bfloat16, seed=6)[1:]
    segment_ids = document_ids(DOCUMENT_LENGTHS)[:, None]
    # A scale other than 1/sqrt(head_dim) (Gemma's) reaches cuDNN's packed call.
    kwargs = dict(window_size_left=40, window_size_right=0, segment_ids=segment_ids, scale=0.4)
    got = local_attention(q, k, v, implementation="cudnn", max_segments=7, **kwargs)
    assert heads_given == [4 if version < (0, 11, 1) else 2]
    expected = local_attention(*(x.astype(jnp.float32) for x in (q, k, v)), implementation="xla",
                               **kwargs)
    np.testing.assert_allclose(got.astype(jnp.float32), expected, atol=2e-2, rtol=2e-2)


def test_packed_layout_of_segment_ids_gives_the_attention_of_the_segments():
    """The offsets and lengths that cuDNN gets, turned into the mask that cuDNN's packed layout
    computes (a query sees the keys of its own packed sequence, causally, in the window),
    equal the segment-id semantics of the blocked kernel."""
    segment_ids = document_ids(DOCUMENT_LENGTHS)
    lengths, offsets = packed_layout(segment_ids, max_segments=7)
    np.testing.assert_array_equal(lengths[0], [50, 30, 120, 80, 20, -1, -1])
    np.testing.assert_array_equal(offsets[0], [0, 50, 80, 200, 280, -1, -1, -1])
    np.testing.assert_array_equal(lengths[2], [10, 290, -1, -1, -1, -1, -1])
    packed = np.full((3, 300), -1)
    for row in range(3):
        for slot, (offset, length) in enumerate(zip(np.asarray(offsets[row]),
                                                    np.asarray(lengths[row]))):
            if length > 0:
                packed[row, offset:offset + length] = slot
    assert (packed >= 0).all()
    np.testing.assert_array_equal(packed, _packed_sequences(lengths, offsets, 300))
    q, k, v = qkv((3, 2, 300, 16), seed=4)
    window = 40
    cudnn_semantics = jax.nn.dot_product_attention(
        *(jnp.swapaxes(x, 1, 2) for x in (q, k, v)),
        mask=_packed_visibility(lengths, offsets, 300, window + 1))
    np.testing.assert_allclose(
        jnp.swapaxes(cudnn_semantics, 1, 2),
        local_attention(q, k, v, window_size_left=window, window_size_right=0,
                        segment_ids=segment_ids[:, None], implementation="xla"),
        atol=2e-5, rtol=2e-5)


def _assert_matches_float32_xla(implementation, q, k, v, **kwargs):
    """bf16 ``implementation`` against the float32 blocked kernel: forward and gradients."""
    def loss(implementation, dtype):
        cotangent = jax.random.normal(jax.random.key(7), q.shape)
        return lambda q, k, v: jnp.sum(local_attention(
            q.astype(dtype), k.astype(dtype), v.astype(dtype), implementation=implementation,
            **kwargs).astype(jnp.float32) * cotangent)

    ours = jax.jit(jax.value_and_grad(loss(implementation, jnp.bfloat16), argnums=(0, 1, 2)))
    reference = jax.jit(jax.value_and_grad(loss("xla", jnp.float32), argnums=(0, 1, 2)))
    (_, got), (_, expected) = ours(q, k, v), reference(q, k, v)
    np.testing.assert_allclose(
        local_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), implementation=implementation,
                        **kwargs).astype(np.float32),
        local_attention(q, k, v, implementation="xla", **kwargs), atol=3e-2, rtol=3e-2)
    for got_grad, expected_grad in zip(got, expected):
        relative = float(jnp.linalg.norm(got_grad - expected_grad) / jnp.linalg.norm(expected_grad))
        assert relative < 1e-2, relative


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs an NVIDIA GPU")
def test_cudnn_implementation_matches_the_blocked_one_on_gpu():
    q, k, v = qkv((2, 4, 1000, 64))
    _assert_matches_float32_xla("cudnn", q, k, v, window_size_left=100, window_size_right=0)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs an NVIDIA GPU")
def test_cudnn_packed_documents_match_the_blocked_kernel_on_gpu():
    """Uneven documents in a 32k row, three unused slots."""
    lengths = (5000, 3000, 12000, 8000, 4768)
    segment_ids = jnp.asarray(np.repeat(np.arange(1, 6), lengths), jnp.int32)[None, None]
    q, k, v = qkv((1, 4, sum(lengths), 64))
    _assert_matches_float32_xla("cudnn", q, k, v, window_size_left=1024, window_size_right=0,
                                segment_ids=segment_ids, max_segments=8)
    assert resolve_implementation("auto", jnp.bfloat16, has_segment_ids=True,
                                  max_segments=8) == "cudnn"


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs an NVIDIA GPU")
def test_cudnn_grouped_heads_with_packed_documents_match_the_blocked_kernel_on_gpu():
    """Grouped k/v heads and packed documents together (the pair that jax before 0.11.1
    computed wrong, silently): outputs and gradients against the float32 blocked kernel."""
    lengths = (1500, 700, 2600, 1096)
    segment_ids = jnp.asarray(np.repeat(np.arange(1, 5), lengths), jnp.int32)[None, None]
    q = qkv((2, 8, sum(lengths), 64), seed=13)[0]
    k, v = qkv((2, 2, sum(lengths), 64), seed=14)[1:]
    _assert_matches_float32_xla("cudnn", q, k, v, window_size_left=256, window_size_right=0,
                                segment_ids=segment_ids, max_segments=6)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs an NVIDIA GPU")
# A window, and one over the whole sequence with a scale other than 1/sqrt(head_dim) (Gemma's).
@pytest.mark.parametrize("left,scale", [(64, None), (1023, 0.2)])
def test_cudnn_grouped_key_value_heads_match_the_blocked_kernel_on_gpu(left, scale):
    q = qkv((2, 8, 1024, 64), jnp.bfloat16, seed=11)[0]
    k, v = qkv((2, 2, 1024, 64), jnp.bfloat16, seed=12)[1:]
    run = lambda name: local_attention(q, k, v, window_size_left=left, window_size_right=0,  # noqa: E731
                                       implementation=name, scale=scale).astype(jnp.float32)
    np.testing.assert_allclose(run("cudnn"), run("xla"), atol=2e-2, rtol=2e-2)
