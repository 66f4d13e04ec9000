"""Local-attention language model: the attention kernel, its Flax modules and the transformer."""

from model.attention import local_attention
from model.modules import LocalSelfAttention, MultiHeadLocalAttention
from model.sampling import generate, sample_logits
from model.transformer import (TransformerConfig, TransformerLM, count_parameters,
                               training_flops_per_token)

__all__ = [
    "LocalSelfAttention",
    "MultiHeadLocalAttention",
    "TransformerConfig",
    "TransformerLM",
    "count_parameters",
    "generate",
    "local_attention",
    "sample_logits",
    "training_flops_per_token",
]
