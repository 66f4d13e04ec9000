"""The command line of train.py, evaluate_run.py, generate.py, export.py and bench/: flags and
config files in, one-line errors out (the process launch itself is launch.py's).

A user's mistake (a missing config file, an unknown ``--config.*`` field at any depth, a value
of the wrong type, an unknown flag, a bad launch) is one line, ``error: ...`` naming the
culprit, and exit status 1: no traceback. The code raises `errors.UserError` for bad input,
and `run` prints it; anything else (a bug, ours or a library's) keeps its traceback.

    cli.define_config_file(path, help)   # --config=FILE and its --config.KEY=VALUE overrides
    flags.DEFINE_string(...)              # the script's own flags
    cli.run(main)                         # absl's app.run with the one-line errors
"""

from __future__ import annotations

import argparse
import difflib
import glob
import importlib.util
import os
import re
import sys
import traceback
from typing import NoReturn

import ml_collections
from absl import app, flags
from ml_collections import config_flags

import launch
from errors import UserError, first_line

# jax 0.11 and newer (requirements.txt) need Python 3.12: an older one, from a virtual
# environment made before the move, says so in one line rather than failing somewhere inside.
if sys.version_info < (3, 12):
    sys.exit(f"error: this is Python {sys.version.split()[0]}; the project needs Python 3.12 or "
             f"newer (jax 0.12): make its environment with the README's python3.12 -m venv")

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "default.py")


def exit_with_error(error: Exception | str) -> NoReturn:
    """Prints ``error: ...`` (one line) and exits 1, for the user's mistakes: the end of a
    script (`run`, the flag parsers), never a library's. Exits at once:
    after a failed restore or save, orbax's abandoned reads and writes would print tracebacks
    at shutdown (nothing is left to write)."""
    print(f"error: {error}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


# --- absl flags (train.py, evaluate_run.py, generate.py, bench/train.py, bench/step.py) -----------

def define_config_file(default_path: str, help_string: str) -> None:
    """``--config=FILE[:ARG]`` (default ``default_path``) with ``--config.KEY=VALUE``
    overrides, as ml_collections' ``DEFINE_config_file`` (locked: no new fields). A missing
    file or an unknown field is a one-line error and exit here, before any work."""
    path = _flag_argument(sys.argv, "config") or default_path
    _define(lambda: _check_overrides(_check_complete(load_config_file(path), path,
                                                     default_path), sys.argv),
            lambda: config_flags.DEFINE_config_file("config", default_path, help_string,
                                                    lock_config=True))


def define_config_dict(config: ml_collections.ConfigDict, help_string: str, whole: str) -> None:
    """``--config.KEY=VALUE`` overrides of ``config``; an unknown field is a one-line error and
    exit, as is a whole ``--config=FILE`` (``whole`` says why)."""
    given = _flag_argument(sys.argv, "config")
    if given is not None:
        exit_with_error(f"--config={given}: {whole}")
    _define(lambda: _check_overrides(config, sys.argv),
            lambda: config_flags.DEFINE_config_dict("config", config, help_string))


def _define(check, define) -> None:
    """``check()`` then ``define()`` (config_flags reads the overrides from sys.argv already
    there), at the script's top level: a mistake is one line and exit 1."""
    try:
        check()
        define()
    except UserError as error:
        exit_with_error(error)
    except flags.Error as error:  # e.g. --config.model=... after --config.model.KEY=...
        exit_with_error(first_line(error))


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """``get_config(ARG)`` of ``FILE[:ARG]``. Raises a one-line `UserError` (naming the file's
    line where it can) where the file does not exist, does not run, has no ``get_config`` or
    returns something other than a ConfigDict."""
    file, colon, argument = path.partition(":")
    if not os.path.isfile(file):
        configs = sorted(os.path.relpath(p) for p in glob.glob(os.path.join(REPO_ROOT, "configs",
                                                                           "[!_]*.py")))
        raise UserError(f"--config={path}: no such file (the configs here: "
                        f"{', '.join(configs)})")
    spec = importlib.util.spec_from_file_location("checked_config", file)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        get_config = getattr(module, "get_config", None)
        if callable(get_config):
            config = get_config(*([argument] if colon else []))
    except Exception as error:  # the user's Python: where it failed, in one line
        message = error.msg if isinstance(error, SyntaxError) else first_line(error)
        raise UserError(f"--config={path}: {_where(error, file)}{type(error).__name__}: "
                        f"{message}") from None
    if not callable(get_config):
        raise UserError(f"--config={path}: {file} defines no get_config() (a config file "
                        f"returns its ConfigDict from get_config, as configs/default.py)")
    if not isinstance(config, ml_collections.ConfigDict):
        raise UserError(f"--config={path}: get_config() returned a {type(config).__name__}; "
                        f"expected an ml_collections.ConfigDict")
    return config


def _check_complete(config: ml_collections.ConfigDict, path: str,
                    default_path: str) -> ml_collections.ConfigDict:
    """``config``, or a one-line `UserError` naming the first field of ``default_path``'s
    config that it lacks (a config file builds on that one and changes what it needs)."""
    def missing(have, want, prefix=""):
        for name in want.keys():
            if name not in have:
                return prefix + name
            if isinstance(want[name], ml_collections.ConfigDict) and isinstance(
                    have[name], ml_collections.ConfigDict):
                found = missing(have[name], want[name], f"{prefix}{name}.")
                if found:
                    return found
        return None

    field = missing(config, load_config_file(default_path))
    if field:
        raise UserError(f"--config={path}: its config has no field {field!r}: a config file "
                        f"starts from {os.path.relpath(default_path)}'s get_config() and changes "
                        f"what it needs")
    return config


def _where(error: Exception, file: str) -> str:
    """``"FILE:LINE: "`` of the deepest line of ``file`` in ``error``'s traceback (a
    SyntaxError's own position), or "" where the file is not in it."""
    if isinstance(error, SyntaxError) and error.lineno:
        return f"{error.filename or file}:{error.lineno}: "
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
             if os.path.abspath(frame.filename) == os.path.abspath(file)]
    return f"{file}:{lines[-1]}: " if lines else ""


def _flag_argument(argv: list[str], name: str) -> str | None:
    """The value of ``--name=VALUE`` or ``--name VALUE`` in ``argv`` (the last one), or None."""
    value = None
    for index, arg in enumerate(argv):
        match = re.fullmatch(rf"--?{name}(=(.*))?", arg)
        if match:
            value = match.group(2) if match.group(1) else (argv[index + 1:index + 2] or [None])[0]
    return value


def _override_paths(argv: list[str]) -> list[str]:
    """The paths of ``argv``'s ``--config.PATH=VALUE`` flags (``--[no]config.PATH`` for a
    bool), e.g. ``model.window_size`` or ``logical_axis_rules[0]``, in order."""
    return [match.group(1) for arg in argv
            if (match := re.match(r"--?(?:no)?config\.([^=\s]+)", arg))]


def _check_overrides(config: ml_collections.ConfigDict, argv: list[str]) -> None:
    """A one-line `UserError` for the first ``--config.PATH`` of ``argv`` that ``config``
    lacks."""
    for path in _override_paths(argv):
        message = unknown_config_field(config, path)
        if message:
            raise UserError(message)


def config_fields_given(argv: list[str]) -> set[str]:
    """The dotted config fields that ``--config.FIELD=VALUE`` flags in ``argv`` set, e.g.
    ``{"model.window_size"}``: the values the user chose, which a run's source must not
    overwrite (`init_from.adopt_source_config`)."""
    return {path.split("[")[0] for path in _override_paths(argv)}


def unknown_config_field(config: ml_collections.ConfigDict, path: str) -> str | None:
    """Why ``--config.<path>`` names no field of ``config`` (with the nearest field name), or
    None where it names one."""
    node, walked = config, []
    for part in path.split("."):
        name = part.split("[")[0]  # a list field's element, e.g. logical_axis_rules[0]
        if not isinstance(node, ml_collections.ConfigDict):
            return f"--config.{path}: {'.'.join(walked)}={node!r} is not a group of fields"
        if name not in node:
            close = difflib.get_close_matches(name, list(node.keys()), n=1)
            hint = f"; did you mean {'.'.join(walked + close)}?" if close else ""
            return (f"--config.{path}: unknown config field {'.'.join(walked + [name])!r}"
                    f"{hint} (configs/default.py lists the fields)")
        node = node[name]
        walked.append(name)
    return None


_PATH_FLAGS = ("workdir", "output", "plot", "probe_plot")


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with a bad flag (unknown, a value of the wrong type, a missing
    required one) or a stray argument as one line."""
    try:
        rest = flags.FLAGS(argv)
    except (flags.Error, TypeError, ValueError) as error:
        exit_with_error(first_line(error))
    if len(rest) > 1:
        exit_with_error(f"unexpected arguments {rest[1:]}: flags are --NAME=VALUE")
    # A shell leaves the ~ of --workdir=~/run as it is: expanded here, as in data.paths.
    for name in _PATH_FLAGS:
        if name in flags.FLAGS and isinstance(flags.FLAGS[name].value, str):
            flags.FLAGS[name].value = os.path.expanduser(flags.FLAGS[name].value)
    return rest


def run(main) -> None:
    """absl's ``app.run(main)`` with `parse_flags`, in a process whose large allocations use
    huge pages (see `launch.restart_with_huge_pages`), under a supervisor in a multi-process
    launch (`launch.supervise_multi_process`). A `UserError` from ``main`` is one line and
    exit 1, as is a collective that fails because another process is gone
    (`launch.lost_peer_message`); any other exception keeps its traceback."""
    launch.restart_with_huge_pages()
    launch.supervise_multi_process()

    def main_with_one_line_errors(argv):
        try:
            return main(argv)
        except UserError as error:
            exit_with_error(error)
        except Exception as error:  # a collective that lost its peer: one line (launch.py)
            message = launch.lost_peer_message(error)
            if message is None:
                raise
            exit_with_error(message)

    app.run(main_with_one_line_errors, flags_parser=parse_flags)


def check_output_file(flag: str, path: str | None) -> None:
    """A one-line `UserError`, before any work, where ``--flag=path`` (a file to write; None:
    not asked for) names a folder, or a folder that does not exist or cannot be written."""
    if not path:
        return
    if os.path.isdir(path):
        raise UserError(f"--{flag}={path!r} is a folder: expected a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserError(f"--{flag}={path!r}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--{flag}={path!r}: the folder {folder} is not writable")


# --- argparse (the bench scripts) ------------------------------------------------------------

def run_plain(main) -> None:
    """``main()`` of an argparse script (bench/), with a `UserError` as one line and exit 1
    (what `run` gives the absl scripts)."""
    try:
        main()
    except UserError as error:
        exit_with_error(error)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line and exit status 1, as the other scripts'."""

    def error(self, message: str) -> None:
        exit_with_error(message)


def int_list(text: str) -> list[int]:
    """``"1024,4096"`` -> ``[1024, 4096]``, for an argparse ``type``."""
    try:
        return [int(value) for value in text.split(",") if value.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated ints") from None
