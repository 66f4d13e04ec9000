"""Parameter and FLOP counts of the model, for throughput (MFU) reports and benchmarks."""

from __future__ import annotations

import flax.linen as nn
import jax

from model.config import TransformerConfig


def count_parameters(params) -> int:
    """Number of scalars in a parameter tree (boxed or not)."""
    return sum(x.size for x in jax.tree.leaves(nn.unbox(params)))


def training_flops_per_token(config: TransformerConfig, seq_len: int) -> float:
    """Forward+backward FLOPs per token: 6 per matmul weight, plus windowed attention.

    The 6 (2 forward, 4 backward per weight and token) is the estimate of Kaplan et al.,
    "Scaling Laws for Neural Language Models" (2020), section 2.1, used for MFU.

    Each token's query scores and mixes at most ``min(window_size + 1, seq_len)`` keys in a
    local layer and ``(seq_len + 1) / 2`` on average in a global (causal) one: 2 matmuls of
    ``2 * heads * head_dim`` FLOPs per key forward, ×3 with the backward. The embedding lookup
    costs nothing; a tied embedding still counts once, as the output matmul.
    """
    head_dim = config.resolved_head_dim
    attention_width = config.num_heads * head_dim
    kv_width = config.resolved_num_kv_heads * head_dim
    per_layer = 2 * config.d_model * (attention_width + kv_width)  # q, out; k, v projections
    # Gated MLPs (swiglu, geglu) have three matrices: gate, up, down.
    per_layer += (2 if config.activation == "gelu" else 3) * config.d_model * config.mlp_dim
    matmul_weights = config.num_layers * per_layer + config.d_model * config.vocab_size
    num_global = len(config.global_layer_indices)
    keys_seen = ((config.num_layers - num_global) * min(config.window_size + 1, seq_len)
                 + num_global * (seq_len + 1) / 2)
    attention = 3 * 2 * 2 * attention_width * keys_seen
    return 6.0 * matmul_weights + attention
