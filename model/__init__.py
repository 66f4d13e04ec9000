"""Local-attention language model: `local_attention` and its kernels, the Flax modules around it,
the transformer, its config and FLOP count, and generation."""

from model.attention import local_attention
from model.config import TransformerConfig
from model.flops import count_parameters, training_flops_per_token
from model.kernels.common import lowering_platform
from model.modules import LocalSelfAttention, MultiHeadLocalAttention
from model.sampling import generate, sample_logits
from model.transformer import TransformerLM

__all__ = [
    "LocalSelfAttention",
    "MultiHeadLocalAttention",
    "TransformerConfig",
    "TransformerLM",
    "count_parameters",
    "generate",
    "local_attention",
    "lowering_platform",
    "sample_logits",
    "training_flops_per_token",
]
