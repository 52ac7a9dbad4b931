"""The one wrapper every command line of the package runs under (main, generate, convert, evaluate,
after_training, eval.results_table, data.curation, data.completions, data.contrast).

    def define_flags(fv, argv): ...          # flags of this command, on its own FlagValues
    def body(fv, args): ...                  # the command; raises on error
    def main(argv=None) -> int: return cli.run(body, define_flags, argv)

A command with several jobs takes the job as its one positional word (`after_training cls-test
--workdir=RUN ...`): `Subcommand` rows say which flags each reads, `subcommand` checks them, and
`subcommand_usage` is the text `--help` prints above the flags. `-h`, `--help`, `--helpshort` and
`--helpfull` all print the command's own flags and exit 0. `config_args` parses the `key=value,...`
text a config file takes after ':' (`--config=configs/eval_smollm2.py:cls=RUN`).

Each invocation gets a fresh `FlagValues`, so a command can be called in-process any number of
times (tests do) and two commands with a flag of the same name (`--config`, `--tokenizer`) never
collide. Errors end with one line on stderr, `error: <what>, <where>`, and exit code 2 for a
wrong invocation (flags, config values) or 1 for a failure; the traceback only with `--debug`.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging as py_logging
import os
import re
import sys
import traceback
from collections.abc import Iterable, Mapping
from typing import Any, Callable

import jax
from absl import app, flags, logging

from clsalign_jax import errors
from clsalign_jax.decode.config import SCHEDULES, DecodeConfig

# Exceptions that report a problem with an input (a file, a record, a value), whatever raised them.
_INPUT_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)


def _flag_name(arg: str) -> str | None:
  if not arg.startswith("-") or arg in ("-", "--"):
    return None
  name = arg.lstrip("-").partition("=")[0]
  return name[2:] if name.startswith("no") and name[2:] in flags.FLAGS else name


def _config_keys(node, prefix: str = "") -> list[str]:
  """Every dotted key of a ConfigDict, sections included."""
  out = []
  for name in node.keys():
    out.append(prefix + name)
    child = node[name]
    if hasattr(child, "keys") and hasattr(child, "lock"):  # a nested ConfigDict
      out += _config_keys(child, f"{prefix}{name}.")
  return out


def _path_of(root, target, prefix: str = "") -> str | None:
  if root is target:
    return prefix
  for name in root.keys():
    child = root[name]
    if hasattr(child, "keys") and hasattr(child, "lock"):
      found = _path_of(child, target, f"{prefix}{name}.")
      if found is not None:
        return found
  return None


def _chain(e: BaseException | None):
  """`e` and the exceptions it was raised from, outermost first."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def _frames(e: BaseException):
  """(frame, line) of every traceback entry of `e` and the exceptions it was raised from."""
  for x in _chain(e):
    tb = x.__traceback__
    while tb is not None:
      yield tb.tb_frame, tb.tb_lineno
      tb = tb.tb_next


def _unknown_key(e: BaseException, argv: list[str]) -> str | None:
  """`<where>: no such config key <key>; did you mean <closest>?` for a lookup of a key a locked
  ConfigDict lacks, `<where>: config.<key>: <why>` for a value a declared key refuses, or None when
  `e` did not come from a ConfigDict. <where> is the override on the command line or the config
  file's line that named the key."""
  from ml_collections import config_dict  # noqa: PLC0415 - only on this error path

  frames = list(_frames(e))
  failed = None  # (the ConfigDict that lacks the key, the key)
  for frame, _ in frames:
    node = frame.f_locals.get("self")
    key = frame.f_locals.get("key", frame.f_locals.get("attribute"))
    if isinstance(node, config_dict.ConfigDict) and isinstance(key, str):
      failed = (node, key)
  if failed is None:
    return None
  node, key = failed
  # The root: the ConfigDict in the traceback's locals that holds the failing one deepest.
  root, prefix = node, ""
  for frame, _ in frames:
    for value in list(frame.f_locals.values()):
      if isinstance(value, config_dict.ConfigDict):
        path = _path_of(value, node)
        if path is not None and len(path) > len(prefix):
          root, prefix = value, path
  known = _config_keys(root)
  wanted = prefix + key
  overrides = [a for a in argv[1:] if re.match(r"^--?(no)?\w+\.", a)]
  culprit = next((a for a in overrides if a.partition("=")[0].lstrip("-").partition(".")[2] == wanted), None)
  culprit = culprit or next((a for a in overrides if f".{wanted}" in a.partition("=")[0]), None)
  if culprit:
    wanted = culprit.partition("=")[0].lstrip("-").partition(".")[2]  # the whole key as typed
    where = culprit
  else:
    files = {os.path.realpath(a.partition("=")[2].partition(":")[0]) for a in argv[1:] if "=" in a}
    lines = [
      f"{frame.f_code.co_filename}:{line}"
      for frame, line in frames
      if os.path.realpath(frame.f_code.co_filename) in files
    ]
    where = lines[-1] if lines else "config"
  if key in node:  # a declared key given a value it refuses (a str for a tuple, ...)
    innermost = [x for x in _chain(e)][-1]
    detail = innermost.args[0] if innermost.args and isinstance(innermost.args[0], str) else str(innermost)
    return f"{where}: config.{wanted}: {detail}"
  leaves = [k for k in known if wanted.count(".") == k.count(".")] or known
  close = difflib.get_close_matches(wanted, leaves, n=1, cutoff=0.5)
  hint = (
    f"; did you mean {close[0]}?"
    if close
    else f"; known keys under {prefix[:-1] or 'config'}: " + ", ".join(sorted(node.keys()))
  )
  return f"{where}: no such config key {wanted}{hint}"


def _parse_message(e: Exception, argv: list[str]) -> str:
  if isinstance(e, SyntaxError):  # a config file that does not parse
    return f"{e.filename}:{e.lineno}: {e.msg}"
  unknown = _unknown_key(e, argv)
  if unknown:
    return unknown
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


class _QuietOrbax:
  """Keeps orbax's warnings and errors, drops its INFO lines (not with an explicit --verbosity)."""

  def filter(self, record) -> bool:
    return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


_QUIET_ORBAX = _QuietOrbax()


def run(
  body: Callable[[flags.FlagValues, list[str]], Any],
  define_flags: Callable[[flags.FlagValues, list[str]], None],
  argv: list[str] | None = None,
  usage: str = "",
) -> int:
  """Parse `argv` (default sys.argv) into a fresh FlagValues and run `body`; returns the exit code.
  `usage` is printed above the flags on --help."""
  argv = list(sys.argv if argv is None else argv)
  fv = flags.FlagValues()
  flags.DEFINE_bool("debug", False, "On an error, print the Python traceback too.", flag_values=fv)
  define_flags(fv, argv)
  # absl's own logging flags (--verbosity, --logtostderr, ...) live on the global FlagValues.
  own = [a for a in argv[1:] if _flag_name(a) not in flags.FLAGS or _flag_name(a) in fv]
  shared = [a for a in argv[1:] if a not in own]
  debug = "--debug" in argv
  if any(a in ("-h", "--help", "--helpshort", "--helpfull") for a in argv[1:]):
    print(f"{usage}\n\n{fv.get_help()}" if usage else fv.get_help(), flush=True)
    return 0
  logging.use_absl_handler()  # before absl's flags are parsed, as app.run does: --verbosity then applies
  try:
    if shared or not flags.FLAGS.is_parsed():
      flags.FLAGS.unparse_flags()
      flags.FLAGS(argv[:1] + shared)
    args = fv(argv[:1] + own)
    if not any(_flag_name(x) in ("v", "verbosity") for x in shared):
      logging.set_verbosity(logging.INFO)  # app.run's default: progress lines such as "resumed from ..."
      # orbax logs every file it reads or writes at INFO: dozens of lines around one generated answer.
      logging.get_absl_handler().python_handler.addFilter(_QUIET_ORBAX)
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


def no_arguments(args: list[str]) -> None:
  """A command that takes flags only: a positional argument is a usage error naming it."""
  if args:
    raise errors.UsageError(f"unexpected arguments: {args} (see --help)")


@dataclasses.dataclass(frozen=True)
class Subcommand:
  """One job of a command with several: what it does and the flags it reads."""

  help: str
  required: tuple[str, ...] = ()
  optional: tuple[str, ...] = ()


def subcommand_usage(prog: str, commands: Mapping[str, Subcommand]) -> str:
  lines = [f"usage: python -m {prog} <subcommand> [--flag=value ...]", "", "subcommands:"]
  for name, c in commands.items():
    flag_list = [f"--{f}=..." for f in c.required] + [f"[--{f}=...]" for f in c.optional]
    lines += [f"  {name} {' '.join(flag_list)}", f"      {c.help}"]
  return "\n".join(lines)


def subcommand(fv: flags.FlagValues, args: list[str], commands: Mapping[str, Subcommand]) -> str:
  """The subcommand `args` names. Usage errors: not exactly one known name, a required flag
  missing, or a flag given that only another subcommand reads (it would be ignored silently)."""
  if len(args) != 1 or args[0] not in commands:
    got = " ".join(args) if args else "none"
    raise errors.UsageError(f"expected one subcommand of {', '.join(commands)}; got {got} (see --help)")
  name, c = args[0], commands[args[0]]
  missing = [f"--{f}" for f in c.required if fv[f].value in (None, "")]
  if missing:
    raise errors.UsageError(f"{name}: {', '.join(missing)} required (see --help)")
  readers = {f for other in commands.values() for f in other.required + other.optional}
  foreign = [f"--{f}" for f in sorted(readers - set(c.required + c.optional)) if fv[f].present]
  if foreign:
    raise errors.UsageError(f"{name} does not read {', '.join(foreign)} (see --help)")
  return name


def config_args(arg: str | None, known: Iterable[str]) -> dict[str, str]:
  """`key=value,key=value` (the text after ':' in `--config=FILE:ARG`) as a dict of strings. A pair
  without '=' or a key not in `known` is a usage error naming the pair: a misspelt key would
  otherwise be ignored."""
  known = tuple(known)
  out = {}
  for pair in (p for p in (arg or "").split(",") if p):
    key, sep, value = pair.partition("=")
    key = key.strip()
    if not sep:
      raise errors.UsageError(f"config argument {pair!r}: expected key=value")
    if key not in known:
      close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
      hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(sorted(known))}"
      raise errors.UsageError(f"config argument {pair!r}: no such key; {hint}")
    out[key] = value.strip()
  return out


def exit_with(main: Callable[[list[str] | None], int]) -> None:
  """`if __name__ == "__main__": cli.exit_with(main)`."""
  sys.exit(main(None))


def define_distributed_flags(fv: flags.FlagValues) -> None:
  """--distributed / --coordinator_address / --num_processes / --process_id, as `main` has them."""
  d = dict(flag_values=fv)
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with cluster auto-detection.", **d)
  flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for jax.distributed.", **d)
  flags.DEFINE_integer("num_processes", None, "Number of processes, for jax.distributed.", **d)
  flags.DEFINE_integer("process_id", None, "This process's index, for jax.distributed.", **d)


def init_distributed(fv: flags.FlagValues) -> None:
  """Joins the process group the distributed flags describe (a no-op without them)."""
  if fv.coordinator_address or fv.num_processes:
    jax.distributed.initialize(fv.coordinator_address, fv.num_processes, fv.process_id)
  elif fv.distributed:
    jax.distributed.initialize()


def define_mesh_flags(fv: flags.FlagValues, default: dict) -> None:
  """--mesh.data / --mesh.fsdp / --mesh.tensor (-1 on one axis: the devices left over)."""
  for axis in ("data", "fsdp", "tensor"):
    flags.DEFINE_integer(f"mesh.{axis}", default[axis], f"Decode mesh: devices on the {axis} axis.", flag_values=fv)


def mesh_value(fv: flags.FlagValues) -> dict:
  return {axis: fv[f"mesh.{axis}"].value for axis in ("data", "fsdp", "tensor")}


# Decode flags whose default is the checkpoint's (run facts, else the plain model): the value shown
# in --help applies only when neither the flag nor the run says otherwise.
DECODE_FLAGS = (
  "threshold",
  "tau",
  "schedule",
  "period",
  "anneal_cutoff",
  "refusal",
  "strategic_attention",
  "strategic_decoding",
  "response_sees_cls",
  "end_after_refusal",
)
_RUN = " Default: the run's (run facts), else the plain model's."


def define_decode_flags(fv: flags.FlagValues) -> None:
  """The strategic-decoding flags of every command that decodes (generate, serve)."""
  d = dict(flag_values=fv)
  flags.DEFINE_enum("schedule", "each", [*SCHEDULES, "every"], "Re-classification schedule." + _RUN, **d)
  flags.DEFINE_integer("period", 10, "k of the periodic schedule." + _RUN, lower_bound=1, **d)
  flags.DEFINE_integer(
    "anneal_cutoff", 256, "Last step (exclusive) of the annealing schedule." + _RUN, lower_bound=1, **d
  )
  flags.DEFINE_float(
    "threshold", 0.5, "p(malicious) above this is malicious." + _RUN, lower_bound=0.0, upper_bound=1.0, **d
  )
  flags.DEFINE_integer(
    "tau", 3, "Consecutive malicious re-classifications that confirm a flip." + _RUN, lower_bound=1, **d
  )
  flags.DEFINE_list("r", "10,10,10", "r1,r2,r3 of the inference rules." + _RUN, **d)
  flags.DEFINE_string("refusal", DecodeConfig.refusal_text, "Refusal prefix text." + _RUN, **d)
  flags.DEFINE_bool("strategic_attention", True, "Rules 1-3 (off: CLS reads query + response)." + _RUN, **d)
  flags.DEFINE_bool("strategic_decoding", True, "Insert the refusal prefix (off: never)." + _RUN, **d)
  flags.DEFINE_bool(
    "response_sees_cls", True, "Tokens read the CLS slot (off: the plain model's generation)." + _RUN, **d
  )
  flags.DEFINE_bool(
    "end_after_refusal",
    False,
    "End a response on the last token of an inserted refusal prefix (off: the model continues after it)." + _RUN,
    **d,
  )


def check_decode_flags(fv: flags.FlagValues) -> None:
  """What the decode flags alone can refuse, before any weight is loaded."""
  if fv["r"].present and len(fv.r) != 3:
    raise errors.UsageError(f"--r={','.join(fv.r)}: expected three integers r1,r2,r3")
  if fv["refusal"].present and not fv.refusal.strip():
    raise errors.UsageError("--refusal is empty or whitespace-only")


def decode_config(fv: flags.FlagValues, loaded, max_new_tokens: int) -> DecodeConfig:
  """The decode flags given on the command line over the checkpoint's settings
  (`artifacts.Loaded.decode_config`: run facts, else the plain model's)."""
  check_decode_flags(fv)
  explicit = {name: fv[name].value for name in DECODE_FLAGS if fv[name].present}
  if "refusal" in explicit:
    explicit["refusal_text"] = explicit.pop("refusal")
  if fv["r"].present:
    try:
      explicit["r1"], explicit["r2"], explicit["r3"] = (int(x) for x in fv.r)
    except ValueError:
      raise errors.UsageError(f"--r={','.join(fv.r)}: expected three integers r1,r2,r3") from None
  try:
    return loaded.decode_config(max_new_tokens=max_new_tokens, **explicit)
  except ValueError as e:
    raise errors.UsageError(f"--{e}") from None
