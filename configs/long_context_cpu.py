"""Context 16384 on a CPU: the ~20M-parameter model of bench/model.py (about 560 tokens/s on
2 cores, so a long run), on the stdlib corpus. Scanned, rematerialised layers keep activation
memory at one block (about 2 GiB for the step)."""

from configs import default


def get_config():
    config = default.get_config()
    config.num_train_steps = 2000
    config.batch_size = 1
    config.seq_len = 16384
    config.learning_rate = 1e-3
    config.warmup_steps = 100
    config.checkpoint_every_steps = 100
    config.eval_every_steps = 500
    config.eval_batches = 2
    config.model.num_layers = 8
    config.model.d_model = 384
    config.model.num_heads = 6
    config.model.mlp_dim = 1536
    config.model.window_size = 256
    config.model.remat = True
    config.model.scan_layers = True
    # Documents restart attention; "stream" lets one run across file boundaries, so that
    # every position has a full window of context.
    config.data.packing = "stream"
    config.data.tokenizer = "bytes"  # bench/model.py's vocabulary: its figures apply
    return config
