"""Local-attention language model: the attention kernel, its Flax modules and the transformer."""

from model.attention import local_attention
from model.modules import LocalSelfAttention, MultiHeadLocalAttention

__all__ = ["LocalSelfAttention", "MultiHeadLocalAttention", "local_attention"]
