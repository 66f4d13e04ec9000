"""The ``"dense"`` implementation (model/kernels/dense.py) against the blocked kernel."""

import jax.numpy as jnp
import numpy as np
import pytest

from model import local_attention
from tests.model.inputs import qkv


# jax's function with a scale; with a soft-cap (Gemma 2's), which it lacks, written out.
@pytest.mark.parametrize("with_masks,options", [
    (False, {}), (True, dict(scale=0.3)), (False, dict(scale=0.9, logit_soft_cap=1.0))])
def test_dense_implementation_matches_the_blocked_one(with_masks, options):
    q, k, v = qkv((2, 2, 90, 8))
    kwargs = dict(window_size_left=12, window_size_right=3, **options)
    if with_masks:
        kwargs |= dict(mask=jnp.arange(90) % 7 != 0,
                       segment_ids=jnp.repeat(jnp.arange(3), 30)[None, None])
    np.testing.assert_allclose(local_attention(q, k, v, implementation="dense", **kwargs),
                               local_attention(q, k, v, **kwargs), atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="implementation='dense' supports neither"):
        local_attention(q, k, v, implementation="dense", rel_pos_emb=jnp.ones((16, 8)), **kwargs)
