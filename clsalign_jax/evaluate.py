"""`python -m clsalign_jax.evaluate --config=configs/eval_<name>.py [--config.key=value ...]`.

Runs every variant × attack × benchmark cell of the config (resuming: finished cells are
skipped; a cell whose generations file does not hold every case is generated again), judges
the generations, and writes the tables and plots; see `eval/harness.py`. With a `mesh` key in the
config the variants are restored into their shards and decoded over every device; on several
hosts, start one process per host with `--distributed` (or the coordinator flags), as `main`.
`--dry_run` prints the per-device memory of the compiled decode program instead. It holds the advisory
lock of `clsalign_jax.lock` on `output_dir` meanwhile, so a second evaluation there is refused.
Errors end in one line (`--debug`: with the traceback).
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from clsalign_jax import cli, memory_plan, multihost
from clsalign_jax.errors import UsageError
from clsalign_jax.eval import harness
from clsalign_jax.lock import workdir_lock


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  config_flags.DEFINE_config_file(
    "config", None, "Evaluation config file (configs/eval_*.py).", flag_values=fv, sys_argv=argv
  )
  flags.DEFINE_bool(
    "dry_run",
    False,
    "Print, per device of the config's mesh, the params, KV cache and temporary memory of the compiled "
    "decode program for each variant (batch_size rows, max_new_tokens), then exit.",
    flag_values=fv,
  )
  cli.define_distributed_flags(fv)


def body(fv: flags.FlagValues, args: list[str]) -> None:
  if args:
    raise UsageError(f"unexpected arguments: {args}")
  config = cli.config_value(fv)
  cli.init_distributed(fv)
  h = harness.Harness(config)  # checks the config before the output directory is touched
  if fv.dry_run:
    print(memory_plan.harness_plan(h))
    return
  # Two evaluations writing one output directory would mix their cells: one at a time, as training.
  with workdir_lock(str(h.out), what="output directory", enabled=multihost.primary()):
    h.run()


def main(argv: list[str] | None = None) -> int:
  """Runs the command line `argv` (default sys.argv); returns the exit code."""
  return cli.run(body, define_flags, argv)


if __name__ == "__main__":
  cli.exit_with(main)
