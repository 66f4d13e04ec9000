"""Where text comes from: documents of a split, by ``data.source``.

* ``stdlib`` (default, offline): the running Python's standard library sources, without
  its test suites; about 2% of files (by a hash of the path) form the validation split.
* ``text``: local files, folders or globs (``data.paths``); one document per file, or per
  ``data.document_separator`` line. ``data.validation_paths`` holds the validation text;
  where empty, the hash split, and where that holds out no document (one large file, a few
  files), the last ``validation_fraction`` of the last document (from a line start).
* ``hf``: a HuggingFace ``datasets`` dataset (``data.hf_name``, or a local loader such as
  ``json``/``text`` with ``data.paths`` as its files), streaming where asked.
* ``tfds``: a TensorFlow Datasets dataset through ``tfds.data_source`` (no TensorFlow).

Every bad value becomes a one-line `UserError` naming it.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import sys
import sysconfig
from collections.abc import Iterator

from errors import UserError, first_line

SOURCES = ("stdlib", "text", "hf", "tfds")
SPLITS = ("train", "validation")
_STDLIB_SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages",
                        "__pycache__"}


def in_validation(key: str, fraction: float) -> bool:
    """The deterministic split: a document is held out by a hash of its key (its path)."""
    bucket = int.from_bytes(hashlib.sha1(key.encode()).digest()[:4], "big") / 2**32
    return bucket < fraction


def source_identity(config, split: str) -> dict:
    """What identifies a split's text, for the token cache key: a change means re-tokenizing."""
    identity = {"source": config.source, "split": split,
                "validation_fraction": config.validation_fraction,
                "max_documents": config.max_documents}
    if config.source == "stdlib":
        # The standard library changes only with the Python installation.
        identity["python"] = [sys.version, sysconfig.get_paths()["stdlib"]]
    elif config.source == "text":
        identity["separator"] = config.document_separator
        if config.validation_paths:  # each split is its own files (data.paths may be empty
            # when only the held-out text is evaluated)
            field = "validation_paths" if split == "validation" else "paths"
            identity["split_files"] = _files_signature(text_files(config[field],
                                                                   f"data.{field}"))
        else:
            identity["files"] = _files_signature(text_files(config.paths, "data.paths"))
            identity["split"] = "hash, else the last document's tail"
    elif config.source == "hf":
        identity |= {k: config[k] for k in ("hf_name", "hf_config", "hf_text_field",
                                            "hf_train_split", "hf_validation_split")}
        identity["paths"] = config.paths
    elif config.source == "tfds":
        identity |= {k: config[k] for k in ("tfds_name", "tfds_text_field", "tfds_data_dir",
                                            "tfds_train_split", "tfds_validation_split")}
    return identity


def read_documents(config, split: str) -> Iterator[str]:
    """The documents (str) of ``split`` ('train' or 'validation'), in a fixed order."""
    if split not in SPLITS:
        raise UserError(f"split={split!r}: expected one of {list(SPLITS)}")
    if config.source not in SOURCES:
        raise UserError(f"data.source={config.source!r}: expected one of {list(SOURCES)}")
    documents = {"stdlib": _stdlib_documents, "text": _text_documents, "hf": _hf_documents,
                 "tfds": _tfds_documents}[config.source](config, split)
    if config.max_documents:
        documents = (d for _, d in zip(range(config.max_documents), documents))
    return documents


def _files_signature(files: list[tuple[str, str]]) -> str:
    digest = hashlib.sha1()
    for path, _ in files:
        try:
            stat = os.stat(path)
        except OSError as error:  # e.g. a symbolic link to nothing
            raise UserError(f"{path}: cannot read ({error.strerror})") from None
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def file_size(path: str) -> int:
    """Bytes of ``path``; a `UserError` where it cannot be read."""
    try:
        return os.path.getsize(path)
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror})") from None


def stdlib_files() -> list[tuple[str, str]]:
    """(path, path relative to the stdlib) of its ``*.py`` files, tests excluded, sorted."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for directory, subdirectories, names in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d not in _STDLIB_SKIPPED_DIRS)
        for name in sorted(names):
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                files.append((path, os.path.relpath(path, root)))
    return files


def _stdlib_documents(config, split: str) -> Iterator[str]:
    for path, relative in stdlib_files():
        if in_validation(relative, config.validation_fraction) == (split == "validation"):
            yield _read_text(path)


def text_files(paths, field: str) -> list[tuple[str, str]]:
    """Files named by ``paths`` (a comma-separated string or a list of files, folders, globs)."""
    if isinstance(paths, str):
        paths = [p for p in paths.split(",") if p.strip()]
    if not paths:
        raise UserError(f"{field} is empty: expected files, folders or globs of text")
    files = []
    for pattern in paths:
        pattern = os.path.expanduser(pattern.strip())
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise UserError(f"{field}: {pattern!r} matches no file or folder")
        for match in matches:
            if os.path.isdir(match):  # every file below it, hidden ones (.git, ...) excepted
                found = len(files)
                for directory, subdirectories, names in os.walk(match):
                    subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
                    files += [(os.path.join(directory, n),
                               os.path.relpath(os.path.join(directory, n), match))
                              for n in sorted(names) if not n.startswith(".")]
                if len(files) == found:
                    raise UserError(f"{field}: the folder {match!r} holds no files (hidden "
                                    f"ones, such as .git, are skipped)")
            else:
                files.append((match, os.path.basename(match)))
    return files


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror})") from None


def _text_documents(config, split: str) -> Iterator[str]:
    validation = split == "validation"
    if config.validation_paths:
        field = "data.validation_paths" if validation else "data.paths"
        for path, relative in text_files(config[field.split(".")[1]], field):
            for _, document in keyed_documents(path, relative, config.document_separator):
                yield document
        return
    files = text_files(config.paths, "data.paths")
    fraction = config.validation_fraction
    if fraction == 0 or hash_holds_out_some(files, config.document_separator, fraction):
        for path, relative in files:
            for key, document in keyed_documents(path, relative, config.document_separator):
                if in_validation(key, fraction) == validation:
                    yield document
        return
    # The hash held out nothing: the validation split is the last document's tail.
    last_file = len(files) - 1
    for index, (path, relative) in enumerate(files):
        if validation and index < last_file:
            continue
        documents = (d for _, d in keyed_documents(path, relative, config.document_separator))
        if index < last_file:
            yield from documents
            continue
        last = None  # one document behind, so that the last one is known when the file ends
        for document in documents:
            if last is not None and not validation:
                yield last
            last = document
        if last is not None:
            cut = _tail_start(last, fraction)
            yield last[cut:] if validation else last[:cut]


def keyed_documents(path: str, relative: str, separator: str, start: int = 0,
                    end: int | None = None, first_index: int = 0) -> Iterator[tuple[str, str]]:
    """``(key, document)`` of a text file: the key (its relative path, ``#i`` for the i-th
    document after ``separator`` lines) places it in the hash split. With a separator the file
    is read as a stream, one document in memory at a time, from byte ``start`` to ``end``
    (None: its end; both at the start of a separator line, see `separator_cuts`), its first
    document numbered ``first_index``."""
    if not separator:
        yield relative, _read_text(path)
        return
    for i, document in enumerate(_separated_documents(path, separator, start, end), first_index):
        yield f"{relative}#{i}", document


# Where str.splitlines ends a line, "\r" aside (text mode has made every "\r" a "\n").
_LINE_ENDS = "\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
_BLOCK = 1 << 20  # bytes of a file decoded and split at a time


def _separated_documents(path: str, separator: str, start: int, end: int | None) -> Iterator[str]:
    """The documents between lines equal to ``separator`` in bytes [start, end) of ``path``,
    as `_read_text` and ``str.splitlines`` see its lines (universal newlines; a form feed or
    a line separator ends a line too; a separator line ends in a newline or the file's end);
    empty documents are dropped. Read a block of whole lines at a time."""
    check_separator(separator)
    # The separator and a newline (or the end): a separator line where a line ends before it
    # (checked per match: a lookbehind in the pattern would make the search ten times slower).
    candidate = re.compile(f"{re.escape(separator)}(?:\n|\\Z)")
    current = []  # the pieces of the document being read (it may span blocks)
    try:
        with open(path, "rb") as f:
            f.seek(start)
            position = start
            while end is None or position < end:
                raw = f.read(_BLOCK if end is None else min(_BLOCK, end - position))
                if not raw:
                    break
                if not raw.endswith(b"\n"):
                    raw += f.readline()  # whole lines: a block starts at a line start
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise UserError(f"{path}: not UTF-8 text ({error.reason} at byte "
                                    f"{position + error.start})") from None
                position += len(raw)
                # Text mode's universal newlines: "\r\n" and a lone "\r" end lines as "\n".
                text = text.replace("\r\n", "\n").replace("\r", "\n")
                begin = 0  # of the text not yet in a document
                for match in candidate.finditer(text):
                    if match.start() and text[match.start() - 1] not in _LINE_ENDS:
                        continue  # the separator is the end of a longer line
                    current.append(text[begin:match.start()])
                    document = "".join(current)
                    if document.strip():
                        yield document
                    current, begin = [], match.end()
                current.append(text[begin:])
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror})") from None
    document = "".join(current)
    if document.strip():
        yield document


def check_separator(separator: str) -> None:
    """A `UserError` where ``data.document_separator`` is not one line's text (a line end of
    ``str.splitlines`` in it: no line could equal it)."""
    if separator and separator.splitlines() != [separator]:
        raise UserError(f"data.document_separator={separator!r}: expected one line's text (a "
                        f"line equal to it separates documents)")


def separator_cuts(path: str, separator: str, every: int) -> list[int]:
    """Byte offsets (ascending, none 0) of separator lines about ``every`` bytes apart in
    ``path``, where `keyed_documents` may cut it into parts read on their own: the start of a
    line that is ``separator`` followed by "\n" or "\r\n" after a "\n". Reads only from
    each offset aimed at to the next such line."""
    if not separator:
        return []
    lines = (separator.encode() + b"\n", separator.encode() + b"\r\n")
    cuts = []
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            target = every
            while target < size:
                f.seek(target - 1)
                f.readline()  # to the start of the line after byte target - 1
                position = f.tell()
                for raw in f:
                    if raw in lines:
                        cuts.append(position)
                        break
                    position += len(raw)
                else:
                    break
                target = position + every
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror})") from None
    return cuts


def hash_holds_out_some(files: list[tuple[str, str]], separator: str, fraction: float) -> bool:
    """Whether the hash split of ``files`` ((path, relative) pairs) holds out any document
    (read as far as the first one held out)."""
    for path, relative in files:
        keys = ([relative] if not separator else
                (key for key, _ in keyed_documents(path, relative, separator)))
        if any(in_validation(key, fraction) for key in keys):
            return True
    return False


def _tail_start(document: str, fraction: float) -> int:
    """Where the last ``fraction`` of ``document`` starts: the first line start from there
    on, or the character itself where no line starts later."""
    cut = len(document) - max(1, round(len(document) * fraction))
    line_start = document.find("\n", max(cut - 1, 0)) + 1
    return line_start if 0 < line_start < len(document) else cut


def _hf_documents(config, split: str) -> Iterator[str]:
    import datasets
    import huggingface_hub

    if not config.hf_name:
        raise UserError("data.hf_name is empty: expected a HuggingFace dataset name or a "
                        "loader such as 'json', 'text', 'parquet' with data.paths")
    hf_split = config.hf_validation_split if split == "validation" else config.hf_train_split
    data_files = None
    if config.paths:
        data_files = {hf_split: [path for path, _ in text_files(config.paths, "data.paths")]}
    # Where the Hub does not answer, huggingface_hub would retry it for ~24 s first.
    offline = datasets.config.HF_HUB_OFFLINE or huggingface_hub.is_offline_mode()
    unreachable = None
    if not offline and _on_the_hub(config.hf_name):
        unreachable = _hub_unreachable(datasets.config.HF_ENDPOINT)
    try:
        with _hub_offline() if unreachable else contextlib.nullcontext():
            dataset = datasets.load_dataset(config.hf_name, config.hf_config or None,
                                            split=hf_split, data_files=data_files,
                                            streaming=config.hf_streaming)
    except ConnectionError as error:  # no network, or HF_HUB_OFFLINE without a cached copy
        raise UserError(
            f"data.hf_name={config.hf_name!r}: cannot reach the Hugging Face Hub "
            f"({unreachable or first_line(error)}); run once with network to download it into "
            f"the HF cache (then HF_DATASETS_OFFLINE=1 reads it offline), or give local files: "
            f"data.hf_name='parquet' (or 'json', 'text') with data.paths") from None
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as error:
        raise UserError(f"data.hf_name={config.hf_name!r} split {hf_split!r}: "
                        f"{first_line(error)}") from None
    columns = dataset.column_names
    if columns is not None and config.hf_text_field not in columns:
        raise UserError(f"data.hf_text_field={config.hf_text_field!r} is not a field of "
                        f"{config.hf_name!r}; it has {sorted(columns)}")
    for record in dataset:
        yield record[config.hf_text_field]


# One request tells an unreachable Hub from a reachable one. Short, so that an offline run
# fails in seconds: the Hub answers a HEAD in well under a second.
_HUB_CHECK_TIMEOUT_S = 2.0


def _on_the_hub(hf_name: str) -> bool:
    """Whether `datasets.load_dataset` looks ``hf_name`` up on the Hub: not a packaged loader
    (``json``, ``text``, ``parquet``, ...) nor a local folder."""
    from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES

    return hf_name not in _PACKAGED_DATASETS_MODULES and not os.path.isdir(hf_name)


def _hub_unreachable(endpoint: str) -> str | None:
    """Why ``endpoint`` gave no answer to one HEAD request (``"<url>: <error>"``), or None where
    it answered, with any status. No retries and no log lines."""
    import httpx2
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=_HUB_CHECK_TIMEOUT_S)
    except (httpx2.TransportError, httpx2.InvalidURL) as error:
        return f"{endpoint}: {type(error).__name__}: {first_line(error)}"
    return None


@contextlib.contextmanager
def _hub_offline():
    """Offline mode, as HF_HUB_OFFLINE=1 sets it at import, for a Hub found unreachable:
    `datasets` then reads its cached copy or fails at once, where online it first retries for
    about 24 s (huggingface_hub's backoff, five retries, each logged twice), and only then
    falls back to the same cache. Both libraries read these flags at call time."""
    import datasets
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def _tfds_documents(config, split: str) -> Iterator[str]:
    import tensorflow_datasets as tfds

    if not config.tfds_name:
        raise UserError("data.tfds_name is empty: expected a TensorFlow Datasets name "
                        "such as 'lm1b' or 'pg19'")
    tfds_split = config.tfds_validation_split if split == "validation" else config.tfds_train_split
    try:
        source = tfds.data_source(config.tfds_name, split=tfds_split,
                                  data_dir=config.tfds_data_dir or None)
    except Exception as error:  # tfds raises many types for a name/split/data_dir it lacks
        raise UserError(f"data.tfds_name={config.tfds_name!r} split {tfds_split!r}: "
                        f"{first_line(error)}") from None
    for index in range(len(source)):
        record = source[index]
        if config.tfds_text_field not in record:
            raise UserError(f"data.tfds_text_field={config.tfds_text_field!r} is not a field "
                            f"of {config.tfds_name!r}; it has {sorted(record)}")
        text = record[config.tfds_text_field]
        yield text.decode("utf-8") if isinstance(text, bytes) else str(text)
