"""cli.py: every command-line mistake in train.py, evaluate_run.py, generate.py and bench/ is one
line naming the culprit, exit status 1, no traceback; found before any work (no compile)."""

import ml_collections
import pytest

import cli
from configs import default
from tests.training import script

TRAIN = ["--config=configs/tiny.py", "--workdir=/nonexistent/run"]


@pytest.mark.parametrize("name, args, message", [
    ("train.py", ["--config=configs/no_such_config.py"],
     "error: --config=configs/no_such_config.py: no such file (the configs here: "),
    ("train.py", ["--config.no_such_field=2"],
     "error: --config.no_such_field: unknown config field 'no_such_field' "),
    ("train.py", ["--config.seq_len=64", "--config.model.no_such_field=1", "--config.seed=3"],
     "error: --config.model.no_such_field: unknown config field 'model.no_such_field' "),
    ("train.py", TRAIN + ["--config.seq_len=64", "--config.mesh.contxt=2"],
     "error: --config.mesh.contxt: unknown config field 'mesh.contxt'; did you mean "
     "mesh.context?"),
    ("train.py", TRAIN + ["--config.seed.x=1"],
     "error: --config.seed.x: seed=0 is not a group of fields"),
    ("train.py", TRAIN + ["--config.batch_size=abc"],
     "error: flag --config.batch_size=abc: invalid literal for int()"),
    ("train.py", TRAIN + ["--no_such_flag=1"], "error: Unknown command line flag 'no_such_flag'"),
    ("train.py", TRAIN + ["configs/tiny.py"],
     "error: unexpected arguments ['configs/tiny.py']: flags are --NAME=VALUE"),
    ("evaluate_run.py", ["--workdir=/nonexistent", "--config.data.no_such_field=1"],
     "error: --config.data.no_such_field: unknown config field 'data.no_such_field' "),
    ("evaluate_run.py", ["--workdir=/nonexistent", "--config.data.max_documents=many"],
     "error: flag --config.data.max_documents=many: invalid literal for int()"),
    ("evaluate_run.py", ["--workdir=/nonexistent", "--seq_len=long"],
     "error: flag --seq_len=long: invalid literal for int()"),
    ("evaluate_run.py", [], "error: flag --workdir=None: Flag --workdir must have a value"),
    ("generate.py", ["--workdir=/nonexistent", "--temperature=hot"],
     "error: flag --temperature=hot: could not convert string to float"),
    ("generate.py", ["--workdir=/nonexistent", "--promt=x"],
     "error: Unknown command line flag 'promt'"),
    ("bench/train.py", ["--config=configs/no_such_config.py"],
     "error: --config=configs/no_such_config.py: no such file"),
    ("bench/train.py", ["--config.model.no_such_field=1"],
     "error: --config.model.no_such_field: unknown config field 'model.no_such_field' "),
    ("bench/train.py", ["--steps=2"], "error: flag --steps=2: 2 is not integer >= 4"),
    ("bench/attention.py", ["--sizes=1024,4k"],
     "error: argument --sizes: '1024,4k': expected comma-separated ints"),
    ("bench/attention.py", ["--window=wide"], "error: argument --window: invalid int value"),
    ("bench/attention.py", ["--no_such_flag"], "error: unrecognized arguments: --no_such_flag"),
    ("bench/memory.py", ["--meshes=data=1;fsdq=2"],
     "error: argument --meshes: 'fsdq=2': expected AXIS=SIZE with AXIS one of"),
    ("bench/memory.py", ["--settings=chunked,tiled"],
     "error: argument --settings: 'tiled': expected some of ['chunked', 'whole_layers', "),
    ("bench/model.py", ["--contexts=1024,x"],
     "error: argument --contexts: '1024,x': expected comma-separated ints"),
    ("bench/data.py", ["--batch_size=8.5"], "error: argument --batch_size: invalid int value"),
    ("bench/data.py", ["--seq_len=0"], "error: --seq_len=0: expected an int >= 1"),
    ("bench/attention.py", ["--methods=foo"], "error: argument --methods: 'foo': expected some"),
    ("bench/restore.py", ["--layers=x"], "error: argument --layers: invalid int value"),
    ("train.py", ["--config=configs/data.py"],
     "error: --config=configs/data.py: its config has no field 'adam_b1': a config file "
     "starts from configs/default.py's get_config()"),
    ("bench/passkey.py", ["--steps=0"], "error: --steps=0: expected an int >= 1"),
    ("bench/passkey.py", ["--only=local"], "error: --only needs --workdir"),
    ("bench/passkey.py", ["--trials=0"], "error: --trials=0: expected an int >= 1"),
    ("bench/passkey.py", ["--plot=/nonexistent/passkey.png"],
     "error: --plot='/nonexistent/passkey.png': the folder /nonexistent does not exist"),
])
def test_command_line_mistakes_are_one_line(name, args, message):
    done = script(name, *args)
    assert done.returncode == 1, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), done.stderr[-2000:]
    assert "Traceback" not in done.stdout


@pytest.mark.parametrize("source, message", [
    ("def get_config(:\n", "bad.py:1: SyntaxError: "),
    ("import ml_collections\n\ndef get_config():\n    return undefined_name\n",
     "bad.py:4: NameError: name 'undefined_name' is not defined"),
    ("from configs import default\n\ndef get_config():\n    config = default.get_config()\n"
     "    config.seq_len = 1 / 0\n    return config\n",
     "bad.py:5: ZeroDivisionError: division by zero"),
    ("CONFIG = {}\n", "defines no get_config()"),
    ("def get_config():\n    return {'seq_len': 64}\n",
     "get_config() returned a dict; expected an ml_collections.ConfigDict"),
])
def test_a_config_file_that_fails_is_one_line_naming_its_line(source, message, tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(source)
    done = script("train.py", f"--config={bad}", f"--workdir={tmp_path / 'run'}")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: --config={bad}: "), done.stderr
    assert message in lines[0]
    assert not (tmp_path / "run").exists()


def test_unknown_config_field_names_the_first_missing_part():
    config = default.get_config()
    assert cli.unknown_config_field(config, "model.d_model") is None
    assert cli.unknown_config_field(config, "logical_axis_rules") is None
    assert cli.unknown_config_field(config, "data.pathz").startswith(
        "--config.data.pathz: unknown config field 'data.pathz'; did you mean data.paths?")
    assert cli.unknown_config_field(config, "modle.d_model.x").startswith(
        "--config.modle.d_model.x: unknown config field 'modle'; did you mean model?")
    nested = ml_collections.ConfigDict({"a": {"b": 1}})
    assert cli.unknown_config_field(nested, "a.b.c") == (
        "--config.a.b.c: a.b=1 is not a group of fields")


def test_an_older_python_is_one_line_naming_the_python_needed():
    """A script run by a Python older than 3.12 (a virtual environment from before the move to
    jax 0.12): faked here by the version that cli.py reads."""
    import subprocess
    import sys

    from tests.training import ROOT

    done = subprocess.run(
        [sys.executable, "-c", "import sys; sys.version_info = (3, 11, 7); "
                               "sys.version = '3.11.7 (faked)'; import cli"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert done.stderr.strip() == (
        "error: this is Python 3.11.7; the project needs Python 3.12 or newer (jax 0.12): make "
        "its environment with the README's python3.12 -m venv")
