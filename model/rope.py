"""Rotary position embeddings (RoPE) and their context-extension scalings.

RoPE (Su et al. 2021, "RoFormer") rotates feature pairs ``(i, i + head_dim / 2)`` of queries
and keys by ``position * inverse_frequency[i]``: the rotate-half layout of Hugging Face's
Llama and Mistral, so their q/k projections map onto ours without a permutation.

A model trained at one context is continued at a longer one by rescaling the inverse
frequencies (`RopeScaling`), as `transformers`' ``modeling_rope_utils`` defines them and with
its field names, so that a config maps one to one onto ``config.json``'s ``rope_scaling``:

- ``default``: none;
- ``linear``: position interpolation (Chen et al. 2023), every frequency divided by ``factor``;
- ``yarn``: YaRN (Peng et al. 2023), high frequencies kept, low ones interpolated, a ramp
  between the wavelengths of ``beta_fast`` and ``beta_slow`` rotations over the original
  context, and cos and sin scaled by an attention factor.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from errors import UserError

ROPE_TYPES = ("default", "linear", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """``model.rope_scaling``: `transformers`' ``rope_scaling`` fields (hashable).

    ``factor``: the context extension (new length / original length). ``yarn`` also reads
    ``original_max_position_embeddings`` (the pretraining context, required), ``beta_fast`` and
    ``beta_slow`` (rotations bounding the ramp), ``attention_factor`` (None: from ``mscale``
    and ``mscale_all_dim`` where both are set, else ``0.1 ln(factor) + 1``) and ``truncate``
    (round the ramp's bounds to whole dimensions).
    """

    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    @classmethod
    def from_dict(cls, values: dict | None) -> RopeScaling:
        """From a config's ``rope_scaling`` dict (None: no scaling); a one-line `UserError`
        names an unknown or bad field."""
        values = dict(values or {})
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"model.rope_scaling.{unknown[0]}: unknown field; expected one of "
                            f"{sorted(known)}")
        scaling = cls(**values)
        scaling.validate()
        return scaling

    def validate(self) -> None:
        def bad(name, expected):
            return UserError(f"model.rope_scaling.{name}={getattr(self, name)!r}: expected "
                             f"{expected}")

        def is_number(value):
            return isinstance(value, numbers.Real) and not isinstance(value, bool)

        if self.rope_type not in ROPE_TYPES:
            raise bad("rope_type", f"one of {list(ROPE_TYPES)}")
        if not is_number(self.factor) or not self.factor >= 1:
            raise bad("factor", "a number >= 1 (the context extension)")
        for name in ("beta_fast", "beta_slow"):
            if not is_number(getattr(self, name)) or not getattr(self, name) > 0:
                raise bad(name, "a number > 0")
        for name in ("attention_factor", "mscale", "mscale_all_dim"):
            value = getattr(self, name)
            if value is not None and (not is_number(value) or not value > 0):
                raise bad(name, "None or a number > 0")
        if not isinstance(self.truncate, bool):
            raise bad("truncate", "a bool")
        original = self.original_max_position_embeddings
        if original is not None and (not isinstance(original, numbers.Integral)
                                     or isinstance(original, bool) or original < 1):
            raise bad("original_max_position_embeddings", "None or a positive int")
        if self.rope_type == "yarn" and original is None:
            raise UserError("model.rope_scaling.rope_type='yarn' needs model.rope_scaling."
                            "original_max_position_embeddings: the context the model was "
                            "pretrained at")

    def as_dict(self) -> dict:
        """The fields as a plain dict (the config's form)."""
        return dataclasses.asdict(self)


NO_SCALING = RopeScaling()


def rope_frequencies(head_dim: int, base: float,
                     scaling: RopeScaling = NO_SCALING) -> tuple[np.ndarray, float]:
    """The inverse frequencies ``(head_dim / 2,)`` float32 (radians per position) and the
    factor that multiplies cos and sin, as `transformers`' ``ROPE_INIT_FUNCTIONS`` compute
    them (``_compute_default/linear_scaling/yarn_parameters``, in float32 as there)."""
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    position_frequencies = np.float32(base) ** exponents  # wavelengths / (2 pi)
    inverse = np.float32(1.0) / position_frequencies
    if scaling.rope_type == "default":
        return inverse, 1.0
    if scaling.rope_type == "linear":
        return inverse / np.float32(scaling.factor), 1.0
    return _yarn(head_dim, base, scaling, inverse, position_frequencies)


def _yarn(head_dim, base, scaling, inverse, position_frequencies) -> tuple[np.ndarray, float]:
    """YaRN's inverse frequencies and attention factor (transformers'
    ``_compute_yarn_parameters``): a linear ramp over the dimensions between those that make
    ``beta_fast`` and ``beta_slow`` rotations over the original context."""
    factor = scaling.factor

    def mscale(scale, coefficient=1.0):
        return 1.0 if scale <= 1 else 0.1 * coefficient * math.log(scale) + 1.0

    attention_factor = scaling.attention_factor
    if attention_factor is None:
        if scaling.mscale and scaling.mscale_all_dim:
            attention_factor = mscale(factor, scaling.mscale) / mscale(factor, scaling.mscale_all_dim)
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations):  # the dimension whose wavelength fits `rotations` times
        return (head_dim * math.log(scaling.original_max_position_embeddings
                                    / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = np.clip((np.arange(head_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    extrapolated = (1 - ramp).astype(np.float32)  # 1: the frequency is kept
    interpolated = np.float32(1.0) / (np.float32(factor) * position_frequencies)
    return (interpolated * (1 - extrapolated) + inverse * extrapolated).astype(np.float32), \
        float(attention_factor)


def apply_rotary(x: jax.Array, positions: jax.Array, base: float,
                 scaling: RopeScaling = NO_SCALING) -> jax.Array:
    """Rotary position embedding (rotate-half form, as Hugging Face's Llama).

    Args:
      x: ``(batch..., seq_len, heads, head_dim)``, head_dim even.
      positions: int, broadcastable to ``(batch..., seq_len)``.
      base: the wavelength base (10000 in the RoPE paper).
      scaling: a context-extension scaling (`RopeScaling`; default none).

    Returns:
      ``x`` with feature pairs ``(i, i + head_dim / 2)`` rotated by
      ``position * inverse_frequency[i]`` (`rope_frequencies`) and scaled by its attention
      factor, in x's dtype (computed in float32).

    Raises:
      ValueError: an odd head_dim.
    """
    if x.shape[-1] % 2:
        raise ValueError(f"rotary embeddings need an even head_dim; got {x.shape[-1]}")
    inverse, attention_factor = rope_frequencies(x.shape[-1], base, scaling)
    angle = jnp.asarray(positions, jnp.float32)[..., None, None] * inverse
    sin, cos = jnp.sin(angle), jnp.cos(angle)  # (batch..., seq_len, 1, half)
    if attention_factor != 1.0:
        sin, cos = sin * attention_factor, cos * attention_factor
    first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)
