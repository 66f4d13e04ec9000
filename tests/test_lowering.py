"""What TPUs and GPUs run, proven at compile time on this CPU: ``jax.export`` lowers the real
splash kernel (not Pallas interpret mode) and the whole pg19-shaped train step for the ``tpu``
platform, ``auto`` choosing for the target (`model.lowering_platform`), and the exported module
calls the Mosaic kernel with the window's blocks and the segment ids, and holds no (sequence ×
sequence) array. For ``cuda`` the step lowers with the blocked kernel; cuDNN's attention needs
a GPU to lower at all (jax asks the driver for cuDNN's version), so its checks are
bench/gpu_check.sh's."""

import base64
import collections
import re

import jax
import jax.numpy as jnp
import pytest

import sharding
from configs import pg19
from model import TransformerConfig, local_attention, lowering_platform
from steps import setup_training

SEQ_LEN, WINDOW, BLOCK = 4096, 1024, 512


def _no_sequence_squared(text: str, seq_len: int) -> bool:
    """No tensor type in ``text`` has two consecutive dimensions of ``seq_len``."""
    return f"{seq_len}x{seq_len}" not in text


def _mosaic_bodies(text: str) -> list[bytes]:
    """The serialized (MLIR bytecode) body of each Mosaic kernel that ``text`` calls."""
    return [base64.b64decode(body) for body in
            re.findall(r'\\22body\\22: \\22([A-Za-z0-9+/=]+)\\22', text)]


# Without, and with Gemma 2's logit soft-cap (the kernel's attn_logits_soft_cap).
@pytest.mark.parametrize("logit_soft_cap", [None, 50.0])
def test_splash_forward_and_backward_lower_for_tpu_as_mosaic_kernels(logit_soft_cap):
    def gradients(q, k, v, segment_ids):
        def loss(q, k, v):
            out = local_attention(q, k, v, segment_ids=segment_ids, window_size_left=WINDOW,
                                  window_size_right=0, implementation="auto",
                                  logit_soft_cap=logit_soft_cap)
            return out.astype(jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    q = jax.ShapeDtypeStruct((2, 4, SEQ_LEN, 128), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((2, 2, SEQ_LEN, 128), jnp.bfloat16)  # grouped heads
    segment_ids = jax.ShapeDtypeStruct((2, 1, SEQ_LEN), jnp.int32)
    with lowering_platform("tpu"):
        exported = jax.export.export(jax.jit(gradients), platforms=["tpu"])(q, kv, kv, segment_ids)
    text = exported.mlir_module()
    assert exported.platforms == ("tpu",)
    # The forward kernel and the backward's dq and dk/dv kernels, each a Mosaic custom call
    # (interpret mode would have lowered to plain loops instead).
    assert text.count("tpu_custom_call") == 3
    # Each kernel computes tanh(s / cap) · cap where there is a cap, and no tanh otherwise.
    bodies = _mosaic_bodies(text)
    assert len(bodies) == 3
    assert all((b"tanh" in body) == (logit_soft_cap is not None) for body in bodies)
    # The window: each of the 8 query blocks visits 3 key blocks (1024 / 512 + 1), not 8; the
    # block tables are the kernel's constant operands.
    blocks = SEQ_LEN // BLOCK
    tables = collections.Counter(re.findall(r"dense<[^>]*> : tensor<1x(\d+)x(\d+)xi8>", text))
    assert (str(blocks), str(WINDOW // BLOCK + 1)) in tables, tables
    assert (str(blocks), str(blocks)) not in tables
    # The segment ids reach the kernels as one int32 row per key/value head.
    assert re.search(rf"tensor<4x{SEQ_LEN}xi32>|tensor<{SEQ_LEN}xi32>", text)
    assert _no_sequence_squared(text, SEQ_LEN)


def _pg19_step(platform: str, **overrides):
    """The exported train step of configs/pg19.py at context 4096 with a small model: scanned
    rematerialised layers, packed documents, grouped heads, one global layer, bfloat16."""
    config = pg19.get_config(str(SEQ_LEN))
    config.batch_size = 8
    model = config.model
    model.num_layers, model.d_model, model.num_heads, model.num_kv_heads = 2, 256, 4, 2
    model.mlp_dim, model.window_size, model.global_layers = 512, 512, (1,)
    model.layer_chunk_size = 512
    for key, value in overrides.items():
        parent, _, name = key.rpartition(".")
        config[parent][name] = value
    training = setup_training(config, TransformerConfig.from_config(model.to_dict(),
                                                                    vocab_size=384))
    batch_sharding = sharding.batch_sharding(training.mesh)
    batch = {name: jax.ShapeDtypeStruct((config.batch_size, SEQ_LEN), dtype,
                                        sharding=batch_sharding)
             for name, dtype in (("inputs", jnp.int32), ("targets", jnp.int32),
                                 ("loss_mask", jnp.float32), ("segment_ids", jnp.int32),
                                 ("positions", jnp.int32))}
    return training.train_step.export(platform, training.abstract_state, batch)


@pytest.mark.parametrize("overrides", [
    {},  # 8-way FSDP, layers in chunks of 1024
    {"mesh.fsdp": 2, "mesh.context": 4},  # context parallel, each block in chunks of 512
    {"mesh.fsdp": 2, "mesh.context": 4, "model.layer_chunk_size": 0},  # whole blocks
])
def test_the_pg19_step_lowers_for_tpu_with_splash(overrides):
    exported = _pg19_step("tpu", **overrides)
    text = exported.mlir_module()
    assert exported.nr_devices == 8
    # Two layers' attention, local and global, forward and backward, as Mosaic kernels:
    # under shard_map, since XLA cannot partition them.
    assert text.count("tpu_custom_call") >= 6
    assert _no_sequence_squared(text, SEQ_LEN)
    if overrides:
        assert "collective_permute" in text  # the halos


def test_the_pg19_step_lowers_for_cuda_with_the_blocked_kernel():
    exported = _pg19_step("cuda", **{"model.attention_implementation": "xla"})
    text = exported.mlir_module()
    assert exported.platforms == ("cuda",) and "tpu_custom_call" not in text
    assert _no_sequence_squared(text, SEQ_LEN)
