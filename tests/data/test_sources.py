"""Document sources: the stdlib default, local text, HuggingFace loaders, TFDS."""

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading

import pytest

from data import sources
from errors import UserError


def test_stdlib_source_is_offline_deterministic_and_split_by_path(data_config):
    files = sources.stdlib_files()
    relative = [r for _, r in files]
    assert relative == sorted(relative, key=lambda r: relative.index(r))  # a fixed order
    assert not any(part in ("test", "tests", "idle_test") for r in relative
                   for part in r.split(os.sep)[:-1])
    assert "os.py" in relative and "json/__init__.py".replace("/", os.sep) in relative
    held_out = [r for r in relative if sources.in_validation(r, data_config.validation_fraction)]
    assert 0.01 < len(held_out) / len(relative) < 0.04
    validation = list(sources.read_documents(data_config, "validation"))
    assert len(validation) == len(held_out)
    root = sysconfig.get_paths()["stdlib"]
    first = open(os.path.join(root, held_out[0]), encoding="utf-8").read()
    assert validation[0] == first


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_text_files_folders_globs_separators_and_held_out_files(data_config, tmp_path):
    _write(tmp_path / "a" / "one.txt", "first")
    _write(tmp_path / "a" / "sub" / "two.txt", "second")
    _write(tmp_path / "b.md", "third\n---\nfourth\n")
    _write(tmp_path / "valid.txt", "held out")
    _write(tmp_path / "a" / ".git" / "HEAD", "hidden folders and files are skipped")
    _write(tmp_path / "a" / ".notes", "hidden")
    data_config.source = "text"
    data_config.paths = f"{tmp_path / 'a'},{tmp_path / '*.md'}"
    data_config.validation_fraction = 0.0
    assert list(sources.read_documents(data_config, "train")) == ["first", "second", "third\n---\nfourth\n"]
    data_config.document_separator = "---"
    assert list(sources.read_documents(data_config, "train"))[2:] == ["third\n", "fourth\n"]
    data_config.validation_paths = str(tmp_path / "valid.txt")
    assert list(sources.read_documents(data_config, "validation")) == ["held out"]
    assert len(list(sources.read_documents(data_config, "train"))) == 4


@pytest.mark.parametrize("setup,message", [
    (lambda c, p: c.update(source="text", paths=str(p / "missing.txt")), "matches no file"),
    (lambda c, p: c.update(source="text", paths=""), "data.paths is empty"),
    (lambda c, p: c.update(source="text", paths=str(p / "bad.bin")), "not UTF-8 text"),
    (lambda c, p: c.update(source="s3"), "data.source='s3': expected one of"),
    (lambda c, p: c.update(source="hf", hf_name=""), "data.hf_name is empty"),
    (lambda c, p: c.update(source="tfds", tfds_name=""), "data.tfds_name is empty"),
    (lambda c, p: c.update(source="text", paths=str(p / "empty")), "the folder .* holds no "
                                                                    "files"),
    (lambda c, p: c.update(source="text", paths=str(p / "linked")),
     r"linked/to_nothing.txt: cannot read \(No such file or directory\)"),
])
def test_bad_sources_raise_one_line_errors(data_config, tmp_path, setup, message):
    (tmp_path / "bad.bin").write_bytes(b"\xff\xfe\x00bad")
    (tmp_path / "linked").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / ".hidden").write_text("skipped")
    (tmp_path / "linked" / "to_nothing.txt").symlink_to(tmp_path / "gone.txt")
    setup(data_config, tmp_path)
    with pytest.raises(UserError, match=message) as error:
        sources.source_identity(data_config, "train")  # what the token cache is keyed by
        list(sources.read_documents(data_config, "train"))
    assert "\n" not in str(error.value)


def test_huggingface_local_json_loader(data_config, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": f"document {i}", "id": i}) + "\n" for i in range(5)))
    data_config.update(source="hf", hf_name="json", paths=str(path), hf_text_field="body",
                       hf_train_split="train")
    assert list(sources.read_documents(data_config, "train")) == [f"document {i}" for i in range(5)]
    data_config.hf_streaming = True
    assert len(list(sources.read_documents(data_config, "train"))) == 5
    data_config.update(hf_text_field="text", hf_streaming=False)
    with pytest.raises(ValueError, match="data.hf_text_field='text' is not a field"):
        list(sources.read_documents(data_config, "train"))


# read_documents in a process of its own, so that huggingface_hub and datasets read the test's
# HF_ENDPOINT and HF_HOME at import. It prints what it raises as the scripts do ('error: ...',
# exit 1) and writes the documents and the seconds that the call took (imports excluded) to
# argv[2].
_READ_HUB_DATASET = """
import json, sys, time
import datasets  # noqa: F401  (imported before the clock starts)
from configs.data import get_config
from data import sources
from errors import UserError

config = get_config()
config.update(source="hf", hf_name=sys.argv[1])
start, documents, status = time.perf_counter(), None, 0
try:
    documents = list(sources.read_documents(config, "train"))
except UserError as error:
    print(f"error: {error}", file=sys.stderr)
    status = 1
json.dump({"seconds": time.perf_counter() - start, "documents": documents},
          open(sys.argv[2], "w"))
sys.exit(status)
"""
_HUB_DATASET = "someone/some-dataset"
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(params=["refused", "silent"])
def unreachable_hub(request):
    """An HF_ENDPOINT that refuses connections (a port just closed), or one that accepts
    them and never answers (a listening socket that never reads)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        if request.param == "silent":
            server.listen(8)
            yield f"http://127.0.0.1:{server.getsockname()[1]}"
            return
        port = server.getsockname()[1]
    yield f"http://127.0.0.1:{port}"


def _read_from_hub(tmp_path, endpoint):
    env = {k: v for k, v in os.environ.items()
           if not k.upper().endswith("_PROXY") and not k.startswith(("HF_", "TRANSFORMERS_"))}
    env |= {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"),
            "PYTHONPATH": _ROOT}
    # A timeout, so that the old behaviour (24 s of retries, minutes where the port never
    # answers) fails the test instead of hanging it.
    run = subprocess.run([sys.executable, "-c", _READ_HUB_DATASET, _HUB_DATASET,
                          str(tmp_path / "result.json")], env=env, cwd=_ROOT,
                         capture_output=True, text=True, timeout=60)
    return run, json.load(open(tmp_path / "result.json"))


def test_an_unreachable_hub_is_one_line_in_seconds(tmp_path, unreachable_hub):
    """Without the check, huggingface_hub retries five times with backoff (~24 s), logging
    each try twice: 22 lines before ours."""
    run, result = _read_from_hub(tmp_path, unreachable_hub)
    lines = (run.stdout + run.stderr).splitlines()
    assert run.returncode == 1, lines
    assert len(lines) <= 2, lines
    assert any(line.startswith(f"error: data.hf_name={_HUB_DATASET!r}: cannot reach the "
                               f"Hugging Face Hub ({unreachable_hub}: ") for line in lines), lines
    assert result["seconds"] < 5


def test_a_hub_that_answers_is_not_taken_for_unreachable(tmp_path):
    """Any answer counts, a 404 included: datasets then says what the Hub said."""
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD

        def log_message(self, *args):
            pass

    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        run, _ = _read_from_hub(tmp_path, f"http://127.0.0.1:{server.server_address[1]}")
        server.shutdown()
    lines = (run.stdout + run.stderr).splitlines()
    assert run.returncode == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"error: data.hf_name={_HUB_DATASET!r} split 'train': "), lines
    assert "cannot reach" not in lines[0]

def test_an_unreachable_hub_still_reads_the_cached_copy(tmp_path):
    """As datasets does after its retries (and with HF_HUB_OFFLINE=1): its latest cached copy
    of the dataset. The copy here is a json dataset's cache laid out as a Hub dataset's
    (<namespace>___<name>/<config>/<version>/<hash>/<name>-<split>.arrow)."""
    import datasets

    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(3)))
    cache = tmp_path / "hf" / "datasets"
    datasets.load_dataset("json", data_files={"train": str(path)}, split="train",
                          cache_dir=str(cache))
    built, = [p for p in cache.glob("json/*/*/*") if p.is_dir()]
    copy = cache / "someone___some-dataset" / "default" / "0.0.0" / "0"
    shutil.copytree(built, copy)
    (copy / "json-train.arrow").rename(copy / "some-dataset-train.arrow")
    info = json.loads((copy / "dataset_info.json").read_text())
    (copy / "dataset_info.json").write_text(json.dumps(info | {"config_name": "default"}))
    with socket.socket() as server:  # a closed port
        server.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{server.getsockname()[1]}"
    run, result = _read_from_hub(tmp_path, endpoint)
    assert run.returncode == 0, run.stderr
    assert result["documents"] == [f"document {i}" for i in range(3)]
    assert result["seconds"] < 5


def test_tfds_source_with_mock_data(data_config):
    import tensorflow_datasets as tfds

    data_config.update(source="tfds", tfds_name="lm1b", tfds_validation_split="test",
                       max_documents=7)
    with tfds.testing.mock_data(num_examples=10):
        documents = list(sources.read_documents(data_config, "validation"))
        assert len(documents) == 7 and all(isinstance(d, str) and d for d in documents)
        data_config.tfds_text_field = "body"
        with pytest.raises(ValueError, match="data.tfds_text_field='body' is not a field"):
            list(sources.read_documents(data_config, "train"))


def test_one_text_file_holds_out_its_tail(data_config, tmp_path):
    # One file is one document: the hash split (2%) cannot hold out part of it.
    lines = [f"line {i:03d} of the only file\n" for i in range(400)]
    _write(tmp_path / "corpus.txt", "".join(lines))
    data_config.update(source="text", paths=str(tmp_path / "corpus.txt"))
    train, = sources.read_documents(data_config, "train")
    validation, = sources.read_documents(data_config, "validation")
    assert train + validation == "".join(lines)
    # The last 2% (8 lines of 400), from a line start.
    assert validation == "".join(lines[-8:])
    # Several files, none held out by the hash: the last file's tail.
    _write(tmp_path / "b.txt", "".join(lines[:100]))
    data_config.paths = f"{tmp_path / 'corpus.txt'},{tmp_path / 'b.txt'}"
    assert not any(sources.in_validation(name, 0.02) for name in ("corpus.txt", "b.txt"))
    assert list(sources.read_documents(data_config, "validation")) == ["".join(lines[98:100])]
    assert list(sources.read_documents(data_config, "train")) == ["".join(lines),
                                                                  "".join(lines[:98])]
    # No hold-out at all where asked for none.
    data_config.validation_fraction = 0.0
    assert list(sources.read_documents(data_config, "validation")) == []
