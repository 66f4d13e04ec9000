"""What ``python train.py`` runs: a 5.5M-parameter model (4 layers, d_model 256) over a
SentencePiece vocabulary of 8192 trained on the embedded stdlib corpus, context 1024 tokens
(about 3,650 bytes of Python), in about 10 minutes on a 2-core CPU. bench/sweep.py chose it:
the best validation bits per byte for that time among the configs it tried (docs/benchmarks.md
has its table and the measured run).

Every other config starts from this one and changes what it needs, so this file lists every
field that train.py, evaluate_run.py and generate.py read.
"""

import ml_collections

from configs import data
from model import config as model_config


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # parameters, dropout and the data order all follow from it

    # Start from the parameters of a workdir's latest checkpoint (PATH@STEP: that step's) or
    # of a Hugging Face Mistral/Llama folder, whose architecture and tokenizer the run takes
    # (init_from.py); empty: random.
    config.init_from = ""

    # Optimisation: AdamW, linear warmup then a decay, global-norm clipping.
    config.num_train_steps = 700
    config.batch_size = 4  # global: sequences per optimizer step, over all devices and hosts
    config.seq_len = 1024  # training context, in tokens
    config.grad_accum_steps = 1  # the batch is split into this many micro-batches, scanned
    config.learning_rate = 3e-3  # peak
    config.warmup_steps = 30
    config.decay_schedule = "cosine"  # cosine | linear, after the warmup
    config.min_learning_rate_ratio = 0.1  # the decay ends at learning_rate * this
    config.weight_decay = 0.1  # on kernels and embeddings only (not norms, biases)
    config.adam_b1 = 0.9
    config.adam_b2 = 0.95
    config.grad_clip_norm = 1.0  # 0 disables clipping

    # Checkpoints (<workdir>/checkpoints/<step>/), evaluation and logging.
    config.checkpoint_every_steps = 100
    config.keep_checkpoints = 3
    config.eval_every_steps = 100  # 0: only at the end
    config.eval_batches = 8  # validation batches per periodic evaluation; 0: the whole split
    config.log_every_steps = 10  # TensorBoard and metrics.jsonl
    config.sample_prompt = "def "  # continued at each evaluation (console and TensorBoard)
    config.sample_tokens = 100
    # Denominator of the MFU estimate, FLOP/s per device; 0: the device kind's bf16 peak where
    # known (GPU, TPU), else a float32 matmul measured at startup (CPU).
    config.peak_flops_per_device = 0.0

    # The model: model.TransformerConfig's fields at their defaults (each field's meaning is
    # declared there, and listed in docs/model.md; vocab_size comes from the tokenizer).
    config.model = model_config.config_dict()

    config.data = data.get_config()
    # Subwords: at about 3.6 bytes a token the model reads 3.6x the text of UTF-8 bytes in the
    # same steps (trained into <workdir>/sentencepiece.model on first use, ~20 s).
    config.data.tokenizer = "sentencepiece"
    config.data.sentencepiece_vocab_size = 8192

    # Devices form a (data, fsdp, context, tensor) mesh; -1 is "the rest of the devices".
    config.mesh = ml_collections.ConfigDict()
    config.mesh.data = -1
    config.mesh.fsdp = 1
    # Context parallelism: each sequence split into this many blocks of seq_len / context
    # positions, one per device; attention exchanges only window-sized halos between them.
    config.mesh.context = 1
    config.mesh.tensor = 1
    # Logical axis names (on every parameter and activation, see model/transformer.py) to mesh
    # axes, MaxText's scheme. The first rule whose mesh axes are still free in an array wins,
    # so activations (batch, length, embed) shard the batch over data and fsdp, the sequence
    # over context and leave embed whole, while parameters shard embed over fsdp and context
    # (ZeRO-3) and heads/kv_heads/mlp/vocab over tensor.
    config.logical_axis_rules = (
        ("batch", ("data", "fsdp")),
        ("length", "context"),
        ("embed", ("fsdp", "context")),
        ("vocab", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),  # key/value heads, where model.num_kv_heads < num_heads
        ("mlp", "tensor"),
        ("kv", None),
        ("layers", None),
    )
    return config
