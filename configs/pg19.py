"""Long-context training on PG-19 books on GPUs or TPUs.

    python train.py --config=configs/pg19.py:65536 --workdir=runs/pg19_64k

The argument after ``:`` is the context (32768 by default; 65536 and 131072 are the other
presets). The global batch holds about 512k tokens at every context. A ~150M-parameter model
(12 layers, d_model 1024, window 1024: a receptive field of 12k tokens per query) in bfloat16
with float32 master weights, scanned and rematerialised layers, parameters and optimizer state
sharded over all devices (FSDP); a 32k SentencePiece vocabulary trained on the books on first
use. Books are packed as separate documents (attention never crosses a book boundary).
Attention picks the fastest exact kernel (``auto``): cuDNN's sliding-window flash attention with
its packed layout on NVIDIA GPUs (7× the training throughput of the blocked kernel on an H100),
splash attention on TPUs. The books come from the HuggingFace hub's Parquet copy
``emozilla/pg19`` (2.3 GB, downloaded once into the HF cache; 28,602 training and 50 validation
books).
"""

from configs import default

_TOKENS_PER_BATCH = 1 << 19


def get_config(context: str = "32768"):
    config = default.get_config()
    seq_len = int(context)
    config.seq_len = seq_len
    config.batch_size = max(1, _TOKENS_PER_BATCH // seq_len)
    config.num_train_steps = 20_000
    config.learning_rate = 1e-3
    config.warmup_steps = 1000
    config.checkpoint_every_steps = 500
    config.eval_every_steps = 1000
    config.eval_batches = 16
    config.log_every_steps = 50
    config.sample_prompt = "It was "
    config.model.num_layers = 12
    config.model.d_model = 1024
    config.model.num_heads = 16
    config.model.mlp_dim = 2816
    config.model.window_size = 1024
    config.model.dtype = "bfloat16"
    config.model.remat = True
    config.model.scan_layers = True
    # Layers in 16k-token chunks (6% recomputed: the window before each chunk): one layer's
    # working set stays that of 16k tokens at any context (see bench/memory.py).
    config.model.layer_chunk_size = min(16384, seq_len)
    config.data.source = "hf"
    config.data.hf_name = "emozilla/pg19"
    config.data.hf_text_field = "text"
    config.data.tokenizer = "sentencepiece"
    config.data.sentencepiece_vocab_size = 32_000
    config.mesh.data = 1
    config.mesh.fsdp = -1
    return config
