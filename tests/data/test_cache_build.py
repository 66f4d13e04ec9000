"""The token cache built in shards by worker processes, resumed, on two processes, and in
bounded memory, each against the cache one process builds in one pass."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from data import ByteTokenizer, SentencePieceTokenizer, shards, sources
from data.token_cache import tokenized_split
from data.tokenizers import train_sentencepiece

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SEPARATOR = "<|end|>"


def _corpus(folder, files=3, documents=40):
    """Text files of documents between separator lines, with what text mode and
    ``str.splitlines`` make of line ends: CRLF, a lone CR, a form feed, a line separator, a
    separator line ending in CRLF or after a form feed, lines that only start with the
    separator, empty documents, a byte-order mark and a separator at the end."""
    folder.mkdir(exist_ok=True)
    for f in range(files):
        parts = []
        for d in range(documents):
            parts.append(f"file {f} document {d}: " + "words and more words " * (d % 7)
                         + ("\r\ncrlf\rcr\x0cform feed\u2028line sep\n" if d % 5 == 0 else "\n"))
            if d % 4 == 1:  # not separator lines: the separator and more on a line
                parts.append(f"{_SEPARATOR}\x0cform feed\n  {_SEPARATOR}\n")
            if d % 7 == 3:  # a separator line after a form feed ends the document
                parts.append(f"page\x0c{_SEPARATOR}\n")
            parts.append(f"{_SEPARATOR}\r\n" if d % 3 == 0 else f"{_SEPARATOR}\n")
            if d % 11 == 0:
                parts.append(f"  \n{_SEPARATOR}\n")  # an empty document: dropped
        (folder / f"part{f}.txt").write_bytes((("\ufeff" if f == 1 else "")
                                               + "".join(parts)).encode())
    return str(folder / "*.txt")


def _documents_read_whole(config, split):
    """The separated documents of the text source as the cache read them before it streamed:
    each file read whole in text mode and split at ``str.splitlines`` lines equal to the
    separator (the reference for the streamed, cut files)."""
    validation = split == "validation"
    for path in sorted(glob.glob(config.paths)):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        documents, current = [], []
        for line in text.splitlines(keepends=True):
            if line.rstrip("\r\n") == config.document_separator:
                documents.append("".join(current))
                current = []
            else:
                current.append(line)
        documents.append("".join(current))
        documents = [d for d in documents if d.strip()]
        for i, document in enumerate(documents):
            if sources.in_validation(f"{os.path.basename(path)}#{i}",
                                     config.validation_fraction) == validation:
                yield document


def _one_pass(documents, tokenizer):
    """The cache's bytes as one process writes them: each document's ids and the end id."""
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32
    return b"".join(np.append(tokenizer.encode(d), tokenizer.end_of_document_id)
                    .astype(dtype).tobytes() for d in documents)


def _cache_files(cache_dir):
    """{name: bytes} of a cache folder's arrays and metadata."""
    return {os.path.basename(p): open(p, "rb").read()
            for p in sorted(glob.glob(os.path.join(cache_dir, "*.tokens"))
                            + glob.glob(os.path.join(cache_dir, "*.json")))}


@pytest.mark.parametrize("source,tokenizer_name", [("text", "bytes"), ("text", "sentencepiece"),
                                                   ("hf", "bytes"), ("tfds", "sentencepiece")])
def test_workers_build_the_one_process_cache(data_config, tmp_path, monkeypatch, source,
                                             tokenizer_name):
    import tensorflow_datasets as tfds

    paths = _corpus(tmp_path / "corpus")
    if source == "text":
        data_config.update(source="text", paths=paths, document_separator=_SEPARATOR,
                           validation_fraction=0.1)
        reference = _documents_read_whole
    elif source == "hf":
        path = tmp_path / "docs.jsonl"
        path.write_text("".join(json.dumps({"text": f"record {i}\n" + "some text " * (i % 9)})
                                + "\n" for i in range(150)))
        data_config.update(source="hf", hf_name="json", paths=str(path),
                           hf_validation_split="train")
        reference = sources.read_documents
    else:
        data_config.update(source="tfds", tfds_name="lm1b", tfds_validation_split="test")
        reference = sources.read_documents
    with tfds.testing.mock_data(num_examples=60):
        if tokenizer_name == "bytes":
            tokenizer = ByteTokenizer()
        else:
            train_sentencepiece(sources.read_documents(data_config, "train"),
                                str(tmp_path / "sp.model"), vocab_size=300)
            tokenizer = SentencePieceTokenizer(str(tmp_path / "sp.model"))
        for split in ("train", "validation"):
            expected = _one_pass(reference(data_config, split), tokenizer)
            data_config.update(workers=1, cache_dir=str(tmp_path / "one"))
            tokenized_split(data_config, split, tokenizer, data_config.cache_dir)
            monkeypatch.setattr(shards, "SHARD_BYTES", 700)  # many shards of a few documents
            data_config.update(workers=2, cache_dir=str(tmp_path / "two"))
            tokens = tokenized_split(data_config, split, tokenizer, data_config.cache_dir)
            monkeypatch.undo()
            assert tokens.tobytes() == expected and len(expected) > 1000
    assert _cache_files(tmp_path / "two") == _cache_files(tmp_path / "one")
    assert sorted(os.listdir(tmp_path / "two")) == sorted(os.listdir(tmp_path / "one"))  # no shards left


class _SlowLoggingTokenizer(ByteTokenizer):
    """Bytes, slowly, appending its process id to ``log_path`` for each document it encodes
    (a build long enough to be killed midway, whose work can be counted)."""

    def __init__(self, log_path):
        self.log_path = str(log_path)

    def encode(self, text):
        with open(self.log_path, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.01)
        return super().encode(text)


def _encoded(log_path) -> list[str]:
    """The process ids of the documents encoded, one per document."""
    return open(log_path).read().split() if os.path.exists(log_path) else []


_BUILD = """
import json, sys
from configs.data import get_config
from data import shards
from tests.data.test_cache_build import _SlowLoggingTokenizer
shards.SHARD_BYTES = 700
config = get_config()
config.update(json.loads(sys.argv[1]))
tokenizer = _SlowLoggingTokenizer(sys.argv[2])
if len(sys.argv) > 3:  # process sys.argv[3] of 2, on a loopback coordinator at sys.argv[4]
    import jax
    from data.pipeline import split_tokens
    jax.distributed.initialize(sys.argv[4], num_processes=2, process_id=int(sys.argv[3]))
    tokens = split_tokens(config, "train", tokenizer)
else:
    from data.token_cache import tokenized_split
    tokens = tokenized_split(config, "train", tokenizer, config.cache_dir)
print(tokens.tobytes().hex())
"""


def _text_config(data_config, tmp_path, **fields):
    data_config.update(source="text", paths=_corpus(tmp_path / "corpus"),
                       document_separator=_SEPARATOR, validation_fraction=0.1, **fields)
    return data_config


@pytest.mark.slow  # processes started and killed
def test_a_killed_build_resumes_its_unfinished_shards(data_config, tmp_path, monkeypatch):
    config = _text_config(data_config, tmp_path, workers=2)
    killed_log = tmp_path / "killed.log"
    build = subprocess.Popen([sys.executable, "-c", _BUILD, json.dumps(config.to_dict()),
                              str(killed_log)], cwd=_ROOT, start_new_session=True,
                             stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not glob.glob(f"{config.cache_dir}/*.shards-700/joined.json"):  # 1 shard joined
        assert build.poll() is None and time.monotonic() < deadline, "ended before the kill"
        time.sleep(0.05)
    os.killpg(build.pid, signal.SIGKILL)  # the build and its workers, mid-shard
    build.wait()
    folder, = glob.glob(f"{config.cache_dir}/*.shards-700")
    finished = [json.load(open(p)) for p in glob.glob(f"{folder}/[0-9]*.json")]  # not joined
    finished.append(json.load(open(f"{folder}/joined.json")))  # the shards joined
    total = len(list(_documents_read_whole(config, "train")))
    assert 0 < sum(meta["documents"] for meta in finished) < total
    assert len(_encoded(killed_log)) < total

    monkeypatch.setattr(shards, "SHARD_BYTES", 700)
    resumed_log = tmp_path / "resumed.log"
    tokens = tokenized_split(config, "train", _SlowLoggingTokenizer(resumed_log),
                             config.cache_dir)
    assert tokens.tobytes() == _one_pass(_documents_read_whole(config, "train"), ByteTokenizer())
    # Only the unfinished shards' documents were tokenized again.
    assert len(_encoded(resumed_log)) == total - sum(meta["documents"] for meta in finished)
    assert not glob.glob(f"{config.cache_dir}/*.shards-*")


@pytest.mark.slow  # two processes of a multi-process JAX run
def test_two_processes_build_one_cache_together(data_config, tmp_path):
    import socket

    config = _text_config(data_config, tmp_path, workers=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    log = tmp_path / "encoded.log"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    builds = [subprocess.Popen([sys.executable, "-c", _BUILD, json.dumps(config.to_dict()),
                                str(log), str(i), address], cwd=_ROOT, text=True,
                               env=environment | {"JAX_PLATFORMS": "cpu"},
                               stdout=subprocess.PIPE) for i in range(2)]
    outputs = [build.communicate(timeout=300)[0] for build in builds]
    assert [build.returncode for build in builds] == [0, 0]
    expected = _one_pass(_documents_read_whole(config, "train"), ByteTokenizer())
    assert [bytes.fromhex(output.split()[-1]) for output in outputs] == [expected] * 2
    # Each process tokenized its part, and no document was tokenized twice.
    by_process = {pid: _encoded(log).count(pid) for pid in set(_encoded(log))}
    assert len(by_process) == 2 and sum(by_process.values()) == len(
        list(_documents_read_whole(config, "train")))


_MEMORY = """
import resource, sys
from configs.data import get_config
from data import ByteTokenizer
from data.token_cache import tokenized_split
config = get_config()
config.update(source="text", document_separator="<|end|>", workers=1, cache_dir=sys.argv[1])
for path in sys.argv[2:]:
    config.paths = path
    tokenized_split(config, "train", ByteTokenizer(), config.cache_dir)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # peak resident bytes
"""


@pytest.mark.slow  # a process of its own, for its peak memory
def test_a_large_file_of_documents_is_read_as_a_stream(tmp_path):
    document = "a line of a document in a large file\n" * 30 + "<|end|>\n"
    (tmp_path / "small.txt").write_text(document * 100)
    with open(tmp_path / "large.txt", "w") as f:
        for _ in range(22):  # 25 MB: one shard
            f.write(document * 1000)
    run = subprocess.run([sys.executable, "-c", _MEMORY, str(tmp_path / "cache"),
                          str(tmp_path / "small.txt"), str(tmp_path / "large.txt")],
                         cwd=_ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    small, large = map(int, run.stdout.split())
    # Read whole, the text alone would add 25 MB to the peak (and its lines twice as much).
    assert large - small < 16 << 20, (small, large)
