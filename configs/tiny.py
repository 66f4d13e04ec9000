"""A model that trains in seconds on the first 40 stdlib files: for tests and smoke runs."""

from configs import default


def get_config():
    config = default.get_config()
    config.num_train_steps = 20
    config.batch_size = 8
    config.seq_len = 64
    config.learning_rate = 1e-2
    config.warmup_steps = 2
    config.checkpoint_every_steps = 5
    config.eval_every_steps = 10
    config.eval_batches = 2
    config.log_every_steps = 1
    config.sample_tokens = 16
    config.model.num_layers = 2
    config.model.d_model = 32
    config.model.num_heads = 2
    config.model.mlp_dim = 64
    config.model.window_size = 16
    config.data.max_documents = 40
    config.data.tokenizer = "bytes"  # nothing to train first
    return config
