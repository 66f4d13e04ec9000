"""The on-disk token cache: reused on restart, rebuilt when stale or corrupt."""

import glob
import multiprocessing
import os
import time

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


def test_a_tokenizers_bos_begins_each_cached_document_under_a_key_of_its_own(data_config,
                                                                            tmp_path):
    """A pretrained tokenizer's BOS (data/tokenizers.py's ``encode_document``) before each
    document; the same tokenizer name without it (the vocabulary is the same) reads another
    cache."""

    class WithBos(ByteTokenizer):
        begin_of_document_id = 300

    config = _text_config(data_config, tmp_path, ["ab", "cde"])
    plain = tokenized_split(config, "train", ByteTokenizer(), config.cache_dir)
    tokens = tokenized_split(config, "train", WithBos(), config.cache_dir)
    np.testing.assert_array_equal(tokens, [300, 97, 98, 256, 300, 99, 100, 101, 256])
    np.testing.assert_array_equal(tokenized_split(config, "train", ByteTokenizer(),
                                                  config.cache_dir), plain)
    assert len(glob.glob(os.path.join(config.cache_dir, "*.tokens"))) == 2


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
    with pytest.raises(ValueError, match=r"data.source='text': the validation split is empty "
                                         r"\(data.validation_fraction=0.0 of the corpus held out\): "
                                         r"raise data.validation_fraction or set "
                                         r"data.validation_paths"):
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


class _LoggingByteTokenizer(ByteTokenizer):
    """Bytes, slowly, appending a line to ``log_path`` for each document it encodes."""

    def __init__(self, log_path):
        self.log_path = log_path

    def encode(self, text):
        with open(self.log_path, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.05)  # a build long enough for the other processes to arrive during it
        return super().encode(text)


def _tokenize_after(barrier, config, log_path, results):
    barrier.wait()
    tokens = tokenized_split(config, "train", _LoggingByteTokenizer(log_path), config.cache_dir)
    results.put(ByteTokenizer().decode(tokens))


def test_processes_asking_at_once_share_one_build(data_config, tmp_path):
    texts = [f"document {i} " * 20 for i in range(6)]
    config = _text_config(data_config, tmp_path, texts)
    context = multiprocessing.get_context("spawn")
    barrier, results, log_path = context.Barrier(4), context.Queue(), tmp_path / "encoded"
    processes = [context.Process(target=_tokenize_after, args=(barrier, config, log_path, results))
                 for _ in range(4)]
    for process in processes:
        process.start()
    decoded = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    expected = ByteTokenizer().decode(np.concatenate(
        [np.append(ByteTokenizer().encode(text), 256) for text in texts]))
    assert decoded == [expected] * 4
    assert len(log_path.read_text().split()) == len(texts)  # one process tokenized, once
    assert not glob.glob(os.path.join(config.cache_dir, "*tmp*"))


def test_crc32_combine_is_the_crc32_of_the_concatenation():
    """The joined cache's checksum comes from its shards' (data/token_cache.py's
    `crc32_combine`): zlib's own CRC-32 of the joined bytes, for lengths 0 to 1 MB."""
    import zlib

    from data.token_cache import crc32_combine

    rng = np.random.default_rng(0)
    for first, second in ((0, 5), (5, 0), (1, 1), (3, 1000), (1 << 20, 12345), (777, 1 << 20)):
        a, b = rng.bytes(first), rng.bytes(second)
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)
