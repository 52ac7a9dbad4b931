"""`python -m clsalign_jax.evaluate --config=configs/eval_<name>.py [--config.key=value ...]`.

Runs every variant × attack × benchmark cell of the config (resuming: finished cells are
skipped; a cell whose generations file does not hold every case is generated again), judges
the generations, and writes the tables and plots; see `eval/harness.py`. Errors end in one
line (`--debug`: with the traceback).
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from clsalign_jax import cli
from clsalign_jax.errors import UsageError
from clsalign_jax.eval import harness


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  config_flags.DEFINE_config_file(
    "config", None, "Evaluation config file (configs/eval_*.py).", flag_values=fv, sys_argv=argv
  )


def body(fv: flags.FlagValues, args: list[str]) -> None:
  if args:
    raise UsageError(f"unexpected arguments: {args}")
  config = cli.config_value(fv)
  harness.run(config)


def main(argv: list[str] | None = None) -> int:
  """Runs the command line `argv` (default sys.argv); returns the exit code."""
  return cli.run(body, define_flags, argv)


if __name__ == "__main__":
  cli.exit_with(main)
