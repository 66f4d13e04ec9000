"""The kernels behind `model.local_attention`, one module per ``implementation``.

`model.attention` checks the arguments, picks the implementation and calls its kernel; each
kernel takes the same arguments as `local_attention` (positional ``q, k, v, mask,
rel_pos_emb, window_size_left, window_size_right, dropout_rate, dropout_rng, segment_ids``,
then keyword ``block_size, precision, max_segments, scale, logit_soft_cap``, the last two
Python floats or None) and returns the same result.

* `model.kernels.xla` (`xla_local_attention`): the blocked O(n·w) kernel in plain XLA, for
  every backend and feature; its tiling is `model.kernels.xla_plan`, its two schedules
  `model.kernels.xla_band` and `model.kernels.xla_looped`.
* `model.kernels.dense` (`dense_local_attention`): ``jax.nn.dot_product_attention`` over the
  full (n, n) scores, a baseline.
* `model.kernels.cudnn` (`cudnn_local_attention`): cuDNN's fused sliding-window attention.
* `model.kernels.splash` (`splash_local_attention`): the Pallas splash attention of TPUs.
* `model.kernels.common`: what several share (head grouping, padding, the masked softmax,
  their one-line errors).
"""
