"""The ``data`` part of a training config (see data/ for what each field does)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.source = "stdlib"  # stdlib | text | hf | tfds
    # text: files, folders or globs, comma-separated; hf: data files of a local loader.
    config.paths = ""
    config.validation_paths = ""  # text: held-out files; empty: a hash split of data.paths
    config.document_separator = ""  # text: a line that separates documents; empty: one per file
    config.validation_fraction = 0.02  # documents held out by the hash split
    config.max_documents = 0  # stop after this many documents per split (0: all)
    config.hf_name = ""  # e.g. "pg19", or a loader ("json", "text", "parquet") with data.paths
    config.hf_config = ""
    config.hf_train_split = "train"
    config.hf_validation_split = "validation"
    config.hf_text_field = "text"
    config.hf_streaming = False
    config.tfds_name = ""  # e.g. "lm1b", "pg19", "wiki40b/en"
    config.tfds_train_split = "train"
    config.tfds_validation_split = "validation"
    config.tfds_text_field = "text"
    config.tfds_data_dir = ""
    config.tokenizer = "bytes"  # bytes | sentencepiece | hf
    config.sentencepiece_model = ""  # empty: trained into <workdir>/sentencepiece.model
    config.sentencepiece_vocab_size = 8192
    # tokenizer "hf": a Hugging Face model folder (tokenizer.json or tokenizer.model, and its
    # config.json's vocab_size and eos_token_id), e.g. a pretrained model's or an export's.
    config.hf_tokenizer = ""
    config.packing = "documents"  # documents: attention stays in each document; stream: not
    # Training rows that get a random pass key planted and asked for later (data/passkey.py;
    # needs packing "stream"): teaches the retrieval that `evaluate_run.py --probe=passkey` tests.
    config.passkey_fraction = 0.0
    config.passkey_questions = 1  # per planted key: more copies to learn from in each row
    # The loss weight of the answers' digits (other tokens: 1); 16 teaches a tiny model to copy
    # keys in 2000 steps where 1 does not (bench/passkey.py).
    config.passkey_answer_weight = 1.0
    config.cache_dir = ""  # tokenized splits; empty: ~/.cache/local_attention_lm
    config.workers = 0  # processes that tokenize a split into the cache; 0: one per core
    config.prefetch = 2  # batches prepared ahead by background threads
    return config
