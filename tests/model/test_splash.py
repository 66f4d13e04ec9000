"""The ``"splash"`` implementation (model/kernels/splash.py), in Pallas interpret mode off TPUs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import local_attention
from tests.model.inputs import DOCUMENT_LENGTHS, document_ids, qkv
from tests.model.reference import dense_local_attention


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("documents", [False, True])
# The second window with Gemma 2's attention scale and logit soft-cap (the kernel's
# attn_logits_soft_cap), which binds: scores of order several against a cap of 1.
@pytest.mark.parametrize("left,right,options", [
    (40, 0, {}), (25, 9, dict(scale=0.5, logit_soft_cap=1.0))])
def test_splash_matches_the_dense_reference(dtype, documents, left, right, options):
    """The splash kernel (Pallas interpret mode off TPUs): forward and gradients."""
    q, k, v = qkv((3, 2, 300, 16), dtype, seed=5)
    segment_ids = document_ids(DOCUMENT_LENGTHS)[:, None] if documents else None

    def loss(function):
        cotangent = jax.random.normal(jax.random.key(6), q.shape)
        return lambda q, k, v: jnp.sum(function(q, k, v).astype(jnp.float32) * cotangent)

    splash = lambda q, k, v: local_attention(  # noqa: E731
        q, k, v, window_size_left=left, window_size_right=right, segment_ids=segment_ids,
        implementation="splash", **options)
    reference = lambda q, k, v: dense_local_attention(  # noqa: E731
        q, k, v, left, right, segment_ids=segment_ids, **options)
    tolerance = 2e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(splash(q, k, v).astype(np.float32),
                               reference(q, k, v).astype(np.float32),
                               atol=tolerance, rtol=tolerance)
    for got, expected in zip(jax.jit(jax.grad(loss(splash), argnums=(0, 1, 2)))(q, k, v),
                             jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)):
        scale = float(jnp.abs(expected.astype(jnp.float32)).max())
        np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32),
                                   atol=(5e-5 if dtype == jnp.float32 else 3e-2) * scale)
