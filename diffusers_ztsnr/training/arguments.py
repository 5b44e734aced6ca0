"""The training scripts' command line: a parser that never abbreviates, ``--config`` files with the flags' names as
keys, one-line errors, and the entry point that turns them into an exit status.

Flags are never abbreviated (``--learning_rat`` is an error naming ``--learning_rate``, not a silent match), and a
config file's keys and values go through the same parser as the command line: an unknown key, a value of the wrong
type or outside a flag's choices is a one-line error naming the file. The flags themselves and their checks are
:mod:`diffusers_ztsnr.training.config`.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NoReturn

USAGE_EXIT_CODE = 2  # argparse's status for a bad command line; ours is the same for bad flags and inputs
LAUNCH_EPILOG = """\
--config FILE (.yaml, .yml or .json) holds flags as keys, named without the leading --; flags on the command
line win over the file. Examples: examples/configs/.

Errors: a bad flag, config key or input path stops the script before it writes anything, with one line on
stderr and exit status 2. Under `accelerate launch` (single process), accelerate re-raises a failed script as a
Python traceback ending in subprocess.CalledProcessError, printed after our line; `accelerate launch -q ...`
(--quiet) leaves our line last and exits with status 1. With several processes, torchrun prints its
ChildFailedError report after our line, with or without -q.
"""


class UsageError(SystemExit):
    """A bad flag, config key or input: one line, ``error: ...``, raised before anything is written.

    In-process it is a ``SystemExit`` carrying the message (like argparse's own errors); the scripts print the line
    and exit with status 2 (:func:`run_script`)."""

    def __init__(self, message: str):
        super().__init__(message if message.startswith("error: ") else f"error: {message}")


class InputError(ValueError):
    """An input the run cannot use (an output folder holding another run, no checkpoint to resume, a model of the
    other script's family); the message says what to change. The scripts print it as one line (status 2)."""


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` shows each flag's default unless its help already says what the default is; an unset (``None``)
    or off (``False``) default is left unsaid, the help text says what happens then."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unsaid = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if not action.option_strings or "default" in text or unsaid:
            return text
        return f"{text} (default: %(default)s)"


class TrainingArgumentParser(argparse.ArgumentParser):
    """The scripts' parser: no abbreviated flags, defaults and the launch notes in ``--help``, and an unknown flag
    named together with the closest real one."""

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        kwargs.setdefault("epilog", LAUNCH_EPILOG)
        super().__init__(**kwargs)
        self.source: str | None = None  # where the arguments being parsed come from, for error messages

    def option_names(self) -> list[str]:
        return [a.dest for a in self._actions if a.option_strings and a.dest != "help"]

    def parse_args(self, args: Sequence[str] | None = None,
                   namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            flags = [e.split("=", 1)[0] for e in extras if e.startswith("--")]
            hint = did_you_mean(flags, self.option_names(), "--")
            self.error(f"unrecognized arguments: {' '.join(extras)}{hint}")
        return parsed

    def error(self, message: str) -> NoReturn:
        if not is_first_rank():  # under torchrun every rank parses the same flags: one copy of the error
            self.exit(USAGE_EXIT_CODE)
        super().error(f"{message} (in {self.source})" if self.source else message)


def did_you_mean(names: list[str], options: Iterable[str], prefix: str) -> str:
    """`` (did you mean --x?)`` for the closest option of each of ``names`` (empty when none is close)."""
    options = list(options)
    pairs = [(name, f"{prefix}{c}") for name in names if (c := closest_option(name, options))]
    if not pairs:
        return ""
    if len(names) == 1:
        return f" (did you mean {pairs[0][1]}?)"
    return f" (did you mean {', '.join(f'{c} for {name}' for name, c in pairs)}?)"


def closest_option(name: str, options: Iterable[str]) -> str | None:
    """The option a misspelt or shortened ``name`` most likely meant (``None``: nothing close)."""
    options = list(options)
    key = name.lstrip("-").replace("-", "_")
    starting = [o for o in options if o.startswith(key)]
    if len(starting) == 1:
        return starting[0]
    close = difflib.get_close_matches(key, starting or options, n=1, cutoff=0.6)
    return close[0] if close else None


USAGE = ("%(prog)s [-h] [--config FILE] --pretrained_model_name_or_path MODEL (--train_data_dir DIR | "
         "--dataset_name NAME) [--output_dir DIR] [flags; see --help]")


def make_parser(description: str) -> TrainingArgumentParser:
    # the short usage: argparse prints it above every error, where the full list of flags would bury the error
    return TrainingArgumentParser(description=description, usage=USAGE)


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse flags; values from ``--config`` fill every flag not given on the command line.

    The file's entries become flags placed before the command line's (``key: value`` -> ``--key=value``,
    ``key: true`` -> ``--key``), so they are converted and checked exactly like typed flags, and a flag typed
    again later wins."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre, _ = parser.parse_known_args(argv)
    if not pre.config:
        return parser.parse_args(argv)
    tokens = config_tokens(parser, load_config_file(pre.config), pre.config)
    source = getattr(parser, "source", None)
    parser.source = f"--config {pre.config}"
    try:
        parser.parse_args(tokens)  # the file alone first: its errors name the file
    finally:
        parser.source = source
    return parser.parse_args([*tokens, *argv])


def config_tokens(parser: argparse.ArgumentParser, values: dict[str, Any], path: str | Path) -> list[str]:
    """The command-line spelling of a config file's entries; unknown keys are a :class:`UsageError` naming the
    closest flag."""
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest not in ("help", "config")}
    unknown = [str(k) for k in values if k not in actions]
    if unknown:
        hint = did_you_mean(unknown, actions, "")
        raise UsageError(f"error: --config {path} has unknown keys {sorted(unknown)}{hint}; keys are the flags' "
                         "names without the leading --.")
    tokens = []
    for key, value in values.items():
        flag = f"--{key}"
        if actions[key].nargs == 0:  # on/off flags
            if not isinstance(value, bool):
                raise UsageError(f"error: --config {path}: {key} is an on/off flag, give true or false (got "
                                 f"{value!r}).")
            tokens += [flag] if value else []
        elif isinstance(value, (dict, list)):
            if not getattr(actions[key].type, "structured", False):  # e.g. ``datasets``: a list of mappings
                raise UsageError(f"error: --config {path}: {key} takes one value (got {value!r}).")
            tokens.append(f"{flag}={json.dumps(value)}")
        elif value is not None:
            tokens.append(f"{flag}={value}")  # '=' keeps a value such as -1 from reading as a flag
    return tokens


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"error: --config {path} does not exist.")
    values = _parse_config_text(path, path.read_text(encoding="utf-8"))
    if not isinstance(values, dict):
        raise UsageError(f"error: --config {path} must hold a mapping of flag names to values.")
    return values


def _parse_config_text(path: Path, text: str) -> Any:
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)
        except (yaml.YAMLError, ValueError) as error:
            raise UsageError(f"error: --config {path} is not valid YAML ({' '.join(str(error).split())}).") from error
    try:
        return json.loads(text)
    except ValueError as error:
        raise UsageError(f"error: --config {path} is not valid JSON ({error}).") from error


def run_script(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> int:
    """Run ``main(argv)`` as a command: a :class:`UsageError` or :class:`InputError` becomes one line on stderr
    (``<script>: error: ...``) and exit status 2, with no traceback; anything else propagates as usual."""
    prog = Path(sys.argv[0]).name or "train"
    try:
        main(sys.argv[1:] if argv is None else list(argv))
    except (UsageError, InputError) as error:
        message = str(error.code) if isinstance(error, UsageError) else f"error: {error}"
        sys.stdout.flush()  # whatever was printed before comes before the error line
        if is_first_rank():  # under torchrun every rank fails alike: print one copy
            print(f"{prog}: {' '.join(message.split())}", file=sys.stderr, flush=True)
        return USAGE_EXIT_CODE
    return 0


def is_first_rank() -> bool:
    """Rank 0 of a torchrun / accelerate launch, or a process started on its own (no ``RANK``)."""
    return os.environ.get("RANK", "0") == "0"
