"""`python -m clsalign_jax.main --config=configs/tiny.py --workdir=DIR [--config.key=value ...]`.

Multi-process: start one process per host (or per local group of devices) with the same
command plus either `--distributed` (clusters jax detects by itself: TPU pods, SLURM, ...)
or `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`.

On Linux/glibc the command restarts itself once with 2 MiB huge pages for host allocations
(clsalign_jax/host_memory.py; CLSALIGN_HUGEPAGES=0 turns it off).

Errors end in one line (`error: ...`; exit code 2 for a wrong flag or config value, 1 for a
failed run); `--debug` adds the traceback.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports below, which the restart would only repeat
  from clsalign_jax import host_memory

  host_memory.reexec_with_huge_pages()

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from clsalign_jax import after_training, cli, multihost, operating_point, train  # noqa: E402
from clsalign_jax import config as config_lib  # noqa: E402


def define_flags(fv: flags.FlagValues, argv: list[str]) -> None:
  config_flags.DEFINE_config_file(
    "config", None, "Training config file (configs/*.py).", flag_values=fv, lock_config=True, sys_argv=argv
  )
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, TensorBoard events.", flag_values=fv)
  flags.DEFINE_bool("dry_run", False, "Print parameter count and per-device memory, then exit.", flag_values=fv)
  flags.DEFINE_integer("dry_run_devices", 0, "Devices to size the dry run for (0: those present).", flag_values=fv)
  cli.define_distributed_flags(fv)


def body(fv: flags.FlagValues, args: list[str]) -> None:
  if args:
    raise app.UsageError(f"unexpected arguments: {args}")
  config = cli.config_value(fv)
  if fv.dry_run:
    print(train.dry_run(config, fv.dry_run_devices or jax.device_count()))
    return
  if not fv.workdir:
    raise app.UsageError("--workdir is required")
  cli.init_distributed(fv)
  logging.info("process %d of %d, %d devices", jax.process_index(), jax.process_count(), jax.device_count())
  config_lib.validate(config)  # before the lock: a refused invocation must not touch the workdir
  # The lock spans training and the after-training stages: both write into the workdir.
  with train.workdir_lock(fv.workdir, enabled=jax.process_index() == 0):
    train.train_and_evaluate(config, fv.workdir)
    if config.views.enabled:
      if multihost.primary():
        point = operating_point.ensure(config, fv.workdir)
        logging.info("CLS threshold %.4f (validation FPR target %.3f)", point["threshold"], point["target_fpr"])
      multihost.barrier("operating_point")  # the others read the threshold it wrote
    if config.after_training.evaluate:
      # Every process: the harness decodes on the mesh of every device; process 0 writes.
      after_training.run(config, fv.workdir)


def main(argv: list[str] | None = None) -> int:
  """Runs the command line `argv` (default sys.argv); returns the exit code."""
  return cli.run(body, define_flags, argv)


if __name__ == "__main__":
  cli.exit_with(main)
