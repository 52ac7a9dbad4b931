"""The one wrapper every command line (main, generate, convert, evaluate) runs under.

    def define_flags(fv, argv): ...          # flags of this command, on its own FlagValues
    def body(fv, args): ...                  # the command; raises on error
    def main(argv=None) -> int: return cli.run(body, define_flags, argv)

Each invocation gets a fresh `FlagValues`, so a command can be called in-process any number of
times (tests do) and two commands with a flag of the same name (`--config`, `--tokenizer`) never
collide. Errors end with one line on stderr, `error: <what>, <where>`, and exit code 2 for a
wrong invocation (flags, config values) or 1 for a failure; the traceback only with `--debug`.
"""

from __future__ import annotations

import sys
import traceback
from typing import Any, Callable

from absl import app, flags, logging

from clsalign_jax import errors

# Exceptions that report a problem with an input (a file, a record, a value), whatever raised them.
_INPUT_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def _flag_name(arg: str) -> str | None:
  if not arg.startswith("-") or arg in ("-", "--"):
    return None
  name = arg.lstrip("-").partition("=")[0]
  return name[2:] if name.startswith("no") and name[2:] in flags.FLAGS else name


def _parse_message(e: Exception, argv: list[str]) -> str:
  if isinstance(e, SyntaxError):  # a config file that does not parse
    return f"{e.filename}:{e.lineno}: {e.msg}"
  lookup = isinstance(e, (KeyError, AttributeError))
  while e.args and isinstance(e.args[0], BaseException):  # config_flags wraps a KeyError in an AttributeError
    e = e.args[0]
  message = e.args[0] if e.args and isinstance(e.args[0], str) else str(e)
  if lookup:  # an override of a config key that does not exist
    key = message.split("'")[1] if message.count("'") >= 2 else ""
    culprit = next((a for a in argv[1:] if key and f".{key}" in a.partition("=")[0]), None)
    message = f"{culprit or key}: no such config key. {message.split(chr(10), 1)[-1]}"
  return f"{message} (see --help)"


def config_value(fv: flags.FlagValues, name: str = "config"):
  """The ConfigDict of a `config_flags` flag; a file that does not load is a usage error naming it."""
  try:
    value = fv[name].value
    if value is not None:
      list(value.keys())  # config_flags loads lazily: make a broken file fail here
  except Exception as e:  # noqa: BLE001 - config_flags defers the file's errors to first access
    raise errors.UsageError(f"--{name}={getattr(fv[name], 'config_filename', '')}: {e}") from None
  if value is None:
    raise errors.UsageError(f"--{name} is required")
  return value


def one_line(message: str) -> str:
  return " ".join(str(message).split())


def report(message: str, code: int) -> int:
  print(f"error: {one_line(message)}", file=sys.stderr, flush=True)
  return code


def exit_code_and_message(e: BaseException) -> tuple[int, str]:
  """How `run` reports an exception that ended a command."""
  if isinstance(e, (flags.Error, app.UsageError)):
    return 2, str(e)
  if isinstance(e, errors.UserError):
    return e.exit_code, str(e)
  if isinstance(e, _INPUT_ERRORS):
    return 1, str(e)
  if isinstance(e, KeyboardInterrupt):
    return 130, "interrupted"
  return 1, f"unexpected {type(e).__name__}: {e} (a bug; rerun with --debug for the traceback)"


def run(body: Callable[[flags.FlagValues, list[str]], Any],
        define_flags: Callable[[flags.FlagValues, list[str]], None], argv: list[str] | None = None) -> int:
  """Parse `argv` (default sys.argv) into a fresh FlagValues and run `body`; returns the exit code."""
  argv = list(sys.argv if argv is None else argv)
  fv = flags.FlagValues()
  flags.DEFINE_bool("debug", False, "On an error, print the Python traceback too.", flag_values=fv)
  define_flags(fv, argv)
  # absl's own logging flags (--verbosity, --logtostderr, ...) live on the global FlagValues.
  own = [a for a in argv[1:] if _flag_name(a) not in flags.FLAGS or _flag_name(a) in fv]
  shared = [a for a in argv[1:] if a not in own]
  debug = "--debug" in argv
  if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
    print(fv.get_help(), flush=True)
    return 0
  logging.use_absl_handler()  # before absl's flags are parsed, as app.run does: --verbosity then applies
  try:
    if shared or not flags.FLAGS.is_parsed():
      flags.FLAGS.unparse_flags()
      flags.FLAGS(argv[:1] + shared)
    args = fv(argv[:1] + own)
    if not any(_flag_name(x) in ("v", "verbosity") for x in shared):
      logging.set_verbosity(logging.INFO)  # app.run's default: progress lines such as "resumed from ..."
    debug = fv.debug
  except Exception as e:  # noqa: BLE001 - config_flags raises KeyError/AttributeError for unknown keys
    if debug:
      traceback.print_exc()
    return report(_parse_message(e, argv), 2)
  try:
    body(fv, args[1:])
  except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - every error ends in one line
    code, message = exit_code_and_message(e)
    if debug:
      traceback.print_exc()
    return report(message, code)
  return 0


def exit_with(main: Callable[[list[str] | None], int]) -> None:
  """`if __name__ == "__main__": cli.exit_with(main)`."""
  sys.exit(main(None))
