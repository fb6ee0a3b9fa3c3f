"""
The command line of every entry point (train.py, sample.py, bench.py, prepare_data.py, the experiments): the
mistake a user can fix (UserError), a flag's old name (RenamedFlag), the one place where a model config from the
user is checked (model_config), comma-separated integer flags, and a data folder's meta.json. So a flag and a
mistake read the same in every script.
"""

import argparse
import json
import os
import sys

from model import GPTConfig


class UserError(ValueError):
    """A mistake the user can fix: a bad flag or config value, a missing or wrong file, a full disk.
    Every entry point prints it as one `error: ...` line and exits 1; any other exception is a bug and
    keeps its traceback, a plain ValueError included."""


def check(ok, message):
    """Refuse what the user can fix: raise UserError(message) unless ok."""
    if not ok:
        raise UserError(message)


def entry(main):
    """Every script's `__main__`: main(); a UserError becomes one `error: ...` line on stderr and exit status 1,
    a mistake the user can fix, said without a traceback; anything else is a bug and keeps its traceback."""
    try:
        main()
    except UserError as e:
        sys.exit("error: " + " ".join(str(e).splitlines()))


class ArgumentParser(argparse.ArgumentParser):
    """Every entry point's parser: argparse's own complaints (an unknown flag, a value of the wrong form) are
    UserErrors too, one `error:` line and exit 1, like every other mistake the user can fix."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message}; see {self.prog} --help")


class RenamedFlag(argparse.Action):
    """A flag's old name, kept only to refuse it with one `error:` line that names the new one:
    parser.add_argument("--old", action=RenamedFlag, new="--new", why="what the new name says")."""

    def __init__(self, option_strings, dest, new, why="", **kwargs):
        kwargs.update(default=argparse.SUPPRESS, help=argparse.SUPPRESS)  # never in args, never in --help
        super().__init__(option_strings, dest, **kwargs)
        self.new, self.why = new, why

    def __call__(self, parser, namespace, values, option_string=None):
        raise UserError(f"{option_string} is now {self.new}" + (f" ({self.why})" if self.why else ""))


def model_config(source, **fields):
    """
    GPTConfig(**fields) for values that come from the user, flags or a file; source says which
    ("the model flags", "checkpoint out/ckpt.pt"). model.py knows nothing of UserError: its config
    checks raise ValueError naming the field. Here, and only here, that ValueError becomes the
    user's mistake: a UserError that names the source too. Values checked here once (at parse time,
    at load time) are then built into a GPTConfig directly; a ValueError anywhere else is a bug.
    """
    try:
        return GPTConfig(**fields)
    except ValueError as e:
        raise UserError(f"{source}: {e}") from None


def resolved(args, **values):
    """The parsed flags and the values resolved from them (a preset's, the device's, a measured dtype), as a
    new namespace: the one argparse returned is never written after parsing, so it holds what the user said."""
    return argparse.Namespace(**{**vars(args), **values})


def int_list(text):
    """An argparse type: comma-separated positive integers, each at most once."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text}: expected comma-separated positive integers")
    if len(set(values)) < len(values):
        raise argparse.ArgumentTypeError(f"{text}: a value is repeated")
    return values


def load_meta(data_dir, files=("meta.json", "train.bin", "val.bin")):
    """meta.json of a folder prepare_data.py wrote, after checking that it holds `files` (sample.py
    needs only meta.json); refuses a missing folder or file and a meta.json without its two fields."""
    todo = ("run python prepare_data.py first (it writes train.bin, val.bin and meta.json), "
            "or point --data_dir at its output")
    if not os.path.isdir(data_dir):
        raise UserError(f"--data_dir={data_dir} does not exist: {todo}")
    for name in files:
        if not os.path.isfile(os.path.join(data_dir, name)):
            raise UserError(f"--data_dir={data_dir} has no {name}: {todo}")
    path = os.path.join(data_dir, "meta.json")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"--data_dir={data_dir}: {path} is not readable JSON ({e}): {todo}") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("tokenizer"), str)
            and isinstance(meta.get("vocab_size"), int) and meta["vocab_size"] > 0):
        raise UserError(f"--data_dir={data_dir}: {path} lacks a 'tokenizer' or a positive integer "
                        f"'vocab_size': {todo}")
    return meta
