"""The on-disk token cache: reused on restart, rebuilt when stale or corrupt."""

import glob
import os

import numpy as np
import pytest

from data import ByteTokenizer, sources
from data.token_cache import tokenized_split


def _text_config(data_config, tmp_path, texts):
    for i, text in enumerate(texts):
        (tmp_path / f"doc{i}.txt").write_text(text)
    data_config.update(source="text", paths=str(tmp_path / "doc*.txt"), validation_fraction=0.0)
    return data_config


def test_documents_joined_with_end_of_document_and_cached(data_config, tmp_path, monkeypatch):
    config = _text_config(data_config, tmp_path, ["ab", "cde"])
    tokenizer = ByteTokenizer()
    tokens = tokenized_split(config, "train", tokenizer, config.cache_dir)
    np.testing.assert_array_equal(tokens, [97, 98, 256, 99, 100, 101, 256])
    assert tokens.dtype == np.uint16 and isinstance(tokens, np.memmap)

    def no_reading(*args):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(sources, "read_documents", no_reading)
    np.testing.assert_array_equal(tokenized_split(config, "train", tokenizer, config.cache_dir), tokens)


def test_stale_and_corrupt_caches_are_rebuilt(data_config, tmp_path):
    config = _text_config(data_config, tmp_path, ["hello"])
    tokenizer = ByteTokenizer()
    tokenized_split(config, "train", tokenizer, config.cache_dir)
    (tmp_path / "doc0.txt").write_text("changed text")  # stale: new size and time
    os.utime(tmp_path / "doc0.txt", ns=(1, 1))
    assert tokenizer.decode(tokenized_split(config, "train", tokenizer, config.cache_dir)) == "changed text"
    for path in glob.glob(os.path.join(config.cache_dir, "*.tokens")):
        with open(path, "r+b") as f:  # corrupt: same size, other bytes
            f.write(b"\x00\x00")
    assert tokenizer.decode(tokenized_split(config, "train", tokenizer, config.cache_dir)) == "changed text"
    for path in glob.glob(os.path.join(config.cache_dir, "*.tokens")):
        with open(path, "r+b") as f:  # truncated
            f.truncate(3)
    assert tokenizer.decode(tokenized_split(config, "train", tokenizer, config.cache_dir)) == "changed text"


def test_empty_corpus_is_a_clear_error(data_config, tmp_path):
    config = _text_config(data_config, tmp_path, ["only"])
    config.validation_fraction = 0.0
    with pytest.raises(ValueError, match="split 'validation' has no text"):
        tokenized_split(config, "validation", ByteTokenizer(), config.cache_dir)


def test_max_documents_is_part_of_the_key_and_failures_leave_no_files(data_config, tmp_path):
    config = _text_config(data_config, tmp_path, ["one", "two", "three"])
    tokenizer = ByteTokenizer()
    config.max_documents = 1
    assert tokenizer.decode(tokenized_split(config, "train", tokenizer, config.cache_dir)) == "one"
    config.max_documents = 0
    assert len(tokenized_split(config, "train", tokenizer, config.cache_dir)) == len("onetwothree") + 3
    (tmp_path / "doc1.txt").write_bytes(b"\xff not utf-8")
    with pytest.raises(ValueError, match="not UTF-8"):
        tokenized_split(config, "train", tokenizer, config.cache_dir)
    assert not glob.glob(os.path.join(config.cache_dir, "*.tmp*"))
