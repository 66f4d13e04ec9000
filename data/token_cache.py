"""Tokenized splits cached on disk as memory-mapped arrays, so that a restart does not
tokenize again.

A split is one flat token array: each document's ids followed by the end-of-document id.
The cache key hashes the source's identity (which files, their sizes and times, or which
dataset), the split and the tokenizer; the metadata beside the array records its length and a
checksum, and an array that does not match (stale, truncated, corrupt) is rebuilt.

A split is built in ordered shards by worker processes and resumed shard by shard (`Build`).
Several processes may ask for the same split at once: those of one multi-process run each
build their part of the shards, then one joins them under a file lock; runs side by side
share one build (the first builds it under the lock while the others wait and then read its
array). Files are written under names unique to their writer and renamed into place, so a
reader never sees a half-written one, even where the lock is not available (some network
file systems).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
import uuid
import zlib

import numpy as np
import tqdm

from data import shards, sources
from data.tokenizers import Tokenizer
from errors import UserError
from folders import writable_folder_problem

_FORMAT = 2


def tokenized_split(config, split: str, tokenizer: Tokenizer, cache_dir: str,
                    process_index: int = 0, process_count: int = 1) -> np.ndarray:
    """All tokens of ``split`` as a read-only memory-mapped array (uint16 where ids fit).

    Built where missing by ``data.workers`` processes (0: one per core), shard by shard
    (`Build`), and resumed where a build was interrupted; process ``process_index`` of
    ``process_count`` (of a multi-host run, whose ``data.cache_dir`` they share) builds its
    part of the shards and waits for the others'. Raises `UserError` for a bad source or
    ``data.workers`` and for an empty split."""
    identity = sources.source_identity(config, split) | {"tokenizer": tokenizer.name,
                                                         "format": _FORMAT}
    if tokenizer.begin_of_document_id is not None:  # in the tokens (absent: the keys of before)
        identity["begin_of_document_id"] = tokenizer.begin_of_document_id
    key = hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]
    base = os.path.join(cache_dir, f"{config.source}-{split}-{key}")
    tokens = _load(base)
    if tokens is None:
        _check_writable(cache_dir)
        build = Build(base, config, split, tokenizer, worker_count(config), process_index,
                      process_count)
        if process_count > 1:  # each process its part at once; then one joins the shards
            with _exclusive(f"{base}.part-{process_index}-of-{process_count}.lock"):
                if not os.path.exists(base + ".json"):
                    build.run(own_part=True)
            build.wait()
        with _exclusive(base + ".lock"):
            tokens = _load(base)  # another process may have built it while we waited
            if tokens is None:
                build.run(own_part=False)  # every shard still missing (all, on one process)
                build.assemble()
                tokens = _load(base)
    if tokens.size == 0:
        if split == "validation" and config.source in ("stdlib", "text") \
                and not config.validation_paths:
            raise UserError(f"data.source={config.source!r}: the validation split is empty "
                            f"(data.validation_fraction={config.validation_fraction} of the "
                            f"corpus held out): raise data.validation_fraction"
                            + (" or set data.validation_paths" if config.source == "text"
                                else ""))
        raise UserError(f"data.source={config.source!r} split {split!r} has no text "
                        f"(empty corpus)")
    return tokens


def _check_writable(cache_dir: str) -> None:
    """A one-line `UserError` naming ``data.cache_dir`` where it cannot be created or written."""
    problem = writable_folder_problem(cache_dir)
    if problem:
        raise UserError(f"data.cache_dir={cache_dir!r}: cannot write the token cache there "
                        f"({problem}); set data.cache_dir to a writable folder")


@contextlib.contextmanager
def _exclusive(lock_path: str):
    """Holds an exclusive lock on ``lock_path`` (released when the process ends, however it
    ends); without one where the file system has no locks."""
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError:  # e.g. ENOLCK: the unique names below still keep the files whole
            pass
        yield


_CHUNK = 4 << 20  # bytes read at a time: the checksum's and assembly's memory


def _checksum(path: str) -> int:
    """CRC-32 of the file's bytes: catches corruption at ~2 GB/s (a restart's main cost). Read
    in chunks, not through the memory map, whose pages would stay in this process's memory."""
    checksum = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            checksum = zlib.crc32(chunk, checksum)
    return checksum


def crc32_combine(crc1: int, crc2: int, length2: int) -> int:
    """CRC-32 of ``a + b`` from ``crc1`` (of ``a``), ``crc2`` (of ``b``) and ``length2`` (bytes of
    ``b``), without reading either: zlib's ``crc32_combine`` (Mark Adler's GF(2) operator
    squaring, as zlib 1.2's crc32.c), which Python's zlib does not expose. Raises nothing."""

    def times(matrix, vector):
        total, row = 0, 0
        while vector:
            if vector & 1:
                total ^= matrix[row]
            vector, row = vector >> 1, row + 1
        return total

    def square(matrix):
        return [times(matrix, matrix[row]) for row in range(32)]

    operator = [0xEDB88320] + [1 << row for row in range(31)]  # one zero bit (reflected)
    for _ in range(3):  # two, four, eight zero bits: one zero byte
        operator = square(operator)
    while length2 > 0:  # length2's bits: 1, 2, 4, ... zero bytes
        if length2 & 1:
            crc1 = times(operator, crc1)
        length2 >>= 1
        operator = square(operator)
    return crc1 ^ crc2


def _append_file(source: str, out) -> None:
    """Appends ``source``'s bytes to the open file ``out`` at its position, copied by the kernel
    (``sendfile``), else through this process where the file system cannot."""
    with open(source, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        offset = 0
        try:
            while offset < size:
                sent = os.sendfile(out.fileno(), f.fileno(), offset, size - offset)
                if not sent:
                    break
                offset += sent
                out.seek(0, os.SEEK_END)
        except OSError:  # e.g. EINVAL on a file system without it: the rest by reading
            pass
        f.seek(offset)
        shutil.copyfileobj(f, out, _CHUNK)


def _load(base: str) -> np.ndarray | None:
    """The cached array, or None where it is missing or does not match its metadata."""
    try:
        with open(base + ".json") as f:
            meta = json.load(f)
        if os.path.getsize(base + ".tokens") != meta["num_tokens"] * np.dtype(meta["dtype"]).itemsize:
            raise ValueError("size mismatch")
        if meta["num_tokens"] == 0:
            return np.zeros((0,), meta["dtype"])
        if _checksum(base + ".tokens") != meta["checksum"]:
            raise ValueError("checksum mismatch")
        return np.memmap(base + ".tokens", dtype=meta["dtype"], mode="r")
    except (FileNotFoundError, NotADirectoryError):  # none yet, or data.cache_dir is a file
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        logging.warning("token cache %s is unusable (%s); rebuilding it", base, error)
        return None


def _worker_context():
    """Where the workers come from: a fork server, a process started afresh once (a fork of
    this one would copy JAX's threads mid-state) with data/shards.py imported, of which
    each worker is a fork (milliseconds, where a fresh interpreter takes seconds)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["data.shards"])
    return context


def worker_count(config) -> int:
    """``data.workers`` (configs saved before the field: 0), 0 meaning one per core this
    process may run on. Raises `UserError` for a value that is not an int >= 0."""
    workers = config.get("workers", 0)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise UserError(f"data.workers={workers!r}: expected 0 (one process per core) or a "
                        f"number of processes >= 1")
    return workers or len(os.sched_getaffinity(0))


class Build:
    """Builds a split's cache from shards (data/shards.py) kept in ``<base>.shards-<size>/``:
    ``plan.json`` (the planned file parts, where the split is planned), ``count.json`` (how
    many shards, once known), each finished shard's ``<index>.tokens`` and ``.json``, and
    ``joined.tokens``, the first finished shards joined in order, as ``joined.json`` records.
    `run` tokenizes the shards not finished yet, on ``workers`` processes (`_worker_context`)
    or, for one, in this one, and (the process that builds it all) joins each in order as it
    finishes and removes it: the tokens are written while hot in the page cache and then
    dropped, so the disk holds the split's tokens about once; `assemble` joins the rest and
    renames the whole into ``<base>.tokens`` beside its ``<base>.json``."""

    def __init__(self, base: str, config, split: str, tokenizer: Tokenizer, workers: int,
                 process_index: int, process_count: int):
        self.base, self.config, self.split, self.tokenizer = base, config, split, tokenizer
        self.workers, self.process_index, self.process_count = workers, process_index, process_count
        self.dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.int32).name
        self.folder = f"{base}.shards-{shards.SHARD_BYTES}"
        self._pool = None
        self._shown: set[int] = set()  # shards counted in the progress bar
        self._documents = 0
        self._progress = None
        self._joining = False

    def run(self, own_part: bool) -> None:
        """Tokenizes the shards that are not finished (with ``own_part``, only this process's
        part: shard ``i`` where ``i % process_count == process_index``)."""
        os.makedirs(self.folder, exist_ok=True)
        self._joining = not own_part
        try:
            planned = self._plan()
            self._progress = tqdm.tqdm(
                total=sum(size for *_, size in planned["shards"]) if planned else None,
                unit="B", unit_scale=True, desc=f"tokenizing {self.config.source} {self.split}",
                delay=2, disable=self.process_index != 0)  # delay: no bar for a small split
            joined = self._joined()
            self._documents = joined["documents"]
            self._progress.update(joined["bytes"] if planned is None else
                                  sum(size for *_, size in planned["shards"][:joined["shards"]]))
            self._shown.update(range(joined["shards"]))
            # Read before any joining, which removes them.
            finished = {i: meta for i in self._shard_indices()
                        if (meta := self._finished(i)) is not None}
            if planned is None:
                self._run_documents(own_part, finished)
            else:
                self._run_planned(planned, own_part, finished)
        finally:
            if self._pool is not None:
                self._pool.shutdown(cancel_futures=True)
                self._pool = None
            if self._progress is not None:
                self._progress.close()

    def wait(self) -> None:
        """Returns once every shard is finished (or the cache is built): the other processes'
        parts too, polled on the shared file system."""
        while not (os.path.exists(self.base + ".json") or self._all_finished()):
            time.sleep(0.5)

    def assemble(self) -> None:
        """Joins the shards not joined yet and renames the whole into the cache (array first,
        metadata last: a crash in between leaves no metadata, so no stale match)."""
        joined = self._join()
        if joined["shards"] != self._count():
            raise RuntimeError(f"{self.folder}: {joined['shards']} shards joined of "
                               f"{self._count()}")
        os.replace(os.path.join(self.folder, "joined.tokens"), self.base + ".tokens")
        self._write_json(self.base + ".json", {
            "num_tokens": joined["num_tokens"], "dtype": self.dtype,
            "checksum": joined["checksum"], "documents": joined["documents"]})
        shutil.rmtree(self.folder, ignore_errors=True)

    def _joined(self) -> dict:
        """How far ``joined.tokens`` goes: ``shards`` (the first that many), ``num_tokens``,
        ``checksum`` (CRC-32 of its bytes), ``documents`` and ``bytes`` (characters of text)."""
        try:
            with open(os.path.join(self.folder, "joined.json")) as f:
                return json.load(f)
        except FileNotFoundError:
            return {"shards": 0, "num_tokens": 0, "checksum": 0, "documents": 0, "bytes": 0}

    def _join(self) -> dict:
        """Appends the finished shards that come next in order to ``joined.tokens``, recording
        each in ``joined.json`` before removing it; returns the record. A crash leaves at most
        one shard's bytes past the record, cut off on the next call."""
        joined = self._joined()
        path = os.path.join(self.folder, "joined.tokens")
        itemsize = np.dtype(self.dtype).itemsize
        # Not append mode: the kernel's copy (sendfile) refuses a file opened to append.
        with open(path, "r+b" if os.path.exists(path) else "w+b") as out:
            out.truncate(joined["num_tokens"] * itemsize)
            out.seek(0, os.SEEK_END)
            while (meta := self._finished(joined["shards"])) is not None:
                shard = self._shard(joined["shards"])
                # The shard's bytes copied without passing through this process, their
                # checksum from the worker's: joining costs this process next to nothing.
                _append_file(shard + ".tokens", out)
                joined["checksum"] = crc32_combine(joined["checksum"], meta["checksum"],
                                                   meta["num_tokens"] * itemsize)
                out.flush()
                for key in ("num_tokens", "documents", "bytes"):
                    joined[key] += meta[key]
                joined["shards"] += 1
                self._write_json(os.path.join(self.folder, "joined.json"), joined)
                os.remove(shard + ".json")
                os.remove(shard + ".tokens")
        return joined

    def _plan(self) -> dict | None:
        """The split's plan (`shards.plan`), made once (its documents counted by the workers)
        and kept in the folder, so that a resumed build cuts the same shards."""
        path = os.path.join(self.folder, "plan.json")
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
        planned = shards.plan(self.config, self.split)
        if planned is None:
            return None
        parts = planned["parts"]
        counted = [i - 1 for i in shards.uncounted(planned)]
        futures = {i: self._submit(len(counted), shards.count_documents, parts[i],
                                   planned["separator"]) for i in counted}
        shards.number_parts(planned, {i: future.result() for i, future in futures.items()})
        self._write_json(path, planned)
        self._write_json(os.path.join(self.folder, "count.json"), len(planned["shards"]))
        return planned

    def _run_planned(self, planned: dict, own_part: bool, finished: dict) -> None:
        """Tokenizes the planned shards that are neither joined (`_shown` from the start) nor
        ``finished`` (index -> metadata)."""
        todo = []
        for index, (*_, size) in enumerate(planned["shards"]):
            if index in finished:
                self._completed(index, size, finished[index]["documents"])
            elif index not in self._shown and (
                    not own_part or index % self.process_count == self.process_index):
                todo.append(index)
        futures = {}
        for index in todo:
            future = self._submit(len(todo), shards.tokenize_shard, self.tokenizer, self.dtype,
                                  index, planned, self._shard(index))
            if future.done():  # tokenized here: joined at once, as the workers' are
                self._completed(index, planned["shards"][index][2], future.result()["documents"])
            else:
                futures[future] = index
        for future in concurrent.futures.as_completed(futures):
            index = futures[future]
            self._completed(index, planned["shards"][index][2], future.result()["documents"])

    def _run_documents(self, own_part: bool, finished: dict) -> None:
        """Reads the split's documents here and hands out the shards to tokenize that are
        neither joined nor ``finished``, at most one more than there are workers at a time
        (the memory of as many shards)."""
        if self._all_finished():
            return
        pending = {}
        count = 0
        waiting = None  # one shard read ahead: a split of one shard is tokenized here

        def hand_out(index, documents, tasks):
            if index in finished:
                self._completed(index, finished[index]["bytes"], finished[index]["documents"])
            elif index not in self._shown and (  # not joined already
                    not own_part or index % self.process_count == self.process_index):
                pending[self._submit(tasks, shards.tokenize_shard, self.tokenizer, self.dtype,
                                     documents, None, self._shard(index))] = index
            if len(pending) > self.workers:
                self._collect(pending, concurrent.futures.FIRST_COMPLETED)

        for count, documents in enumerate(shards.documents_in_shards(
                sources.read_documents(self.config, self.split)), 1):
            if waiting is not None:
                hand_out(count - 2, waiting, 2)
            waiting = documents
        if waiting is not None:
            hand_out(count - 1, waiting, count)
        self._collect(pending, concurrent.futures.ALL_COMPLETED)
        self._write_json(os.path.join(self.folder, "count.json"), count)

    def _collect(self, pending: dict, return_when: str) -> None:
        done, _ = concurrent.futures.wait(pending, return_when=return_when)
        for future in done:
            meta = future.result()
            self._completed(pending.pop(future), meta["bytes"], meta["documents"])

    def _submit(self, tasks: int, function, *args) -> concurrent.futures.Future:
        """``function(*args)`` on the workers, or here, at once, where there is one worker or
        one task."""
        if self.workers == 1 or tasks == 1:
            future = concurrent.futures.Future()
            future.set_result(function(*args))
            return future
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(self.workers,
                                                                mp_context=_worker_context())
        return self._pool.submit(function, *args)

    def _completed(self, index: int, size: int, documents: int) -> None:
        """Counts finished shard ``index`` (``size`` bytes of text) in the progress bar, and
        joins it and the finished ones after it where this process joins."""
        if index not in self._shown:
            self._shown.add(index)
            self._documents += documents
            self._progress.set_postfix(documents=self._documents, refresh=False)
            self._progress.update(size)
        if self._joining:
            self._join()

    def _shard(self, index: int) -> str:
        return os.path.join(self.folder, f"{index:06d}")

    def _shard_indices(self) -> list[int]:
        """The indices of the shards with metadata in the folder (finished, or being joined)."""
        return sorted(int(name[:-5]) for name in os.listdir(self.folder)
                      if name.endswith(".json") and name[:-5].isdigit())

    def _finished(self, index: int) -> dict | None:
        """A finished shard's metadata (see data/shards.py), else None."""
        try:
            with open(self._shard(index) + ".json") as f:
                meta = json.load(f)
            if os.path.getsize(self._shard(index) + ".tokens") == \
                    meta["num_tokens"] * np.dtype(self.dtype).itemsize:
                return meta
        except FileNotFoundError:
            pass
        return None

    def _count(self) -> int | None:
        try:
            with open(os.path.join(self.folder, "count.json")) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def _all_finished(self) -> bool:
        count, joined = self._count(), self._joined()["shards"]
        return count is not None and all(self._finished(i) is not None
                                         for i in range(joined, count))

    def _write_json(self, path: str, value) -> None:
        """Writes ``value`` to ``path`` whole or not at all (renamed into place)."""
        unique = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(unique, "w") as f:
            json.dump(value, f)
        os.replace(unique, path)
