"""`python -m clsalign_jax.main --config=configs/tiny.py --workdir=DIR [--config.key=value ...]`.

Multi-process: start one process per host (or per local group of devices) with the same
command plus either `--distributed` (clusters jax detects by itself: TPU pods, SLURM, ...)
or `--coordinator_address=HOST:PORT --num_processes=N --process_id=I`.
"""

from __future__ import annotations

import logging as py_logging
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from clsalign_jax import checkpoint, pipeline, train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, TensorBoard events.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print parameter count and per-device memory, then exit.")
_DRY_RUN_DEVICES = flags.DEFINE_integer("dry_run_devices", 0, "Devices to size the dry run for (0: those present).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with cluster auto-detection.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for jax.distributed.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes, for jax.distributed.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, for jax.distributed.")


class _QuietOrbax:
  """orbax logs every file it writes at INFO; keep its warnings, drop the rest."""

  def filter(self, record) -> bool:
    return record.levelno >= py_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().python_handler.addFilter(_QuietOrbax())
  config = _CONFIG.value
  if _DRY_RUN.value:
    print(train.dry_run(config, _DRY_RUN_DEVICES.value or jax.device_count()))
    return
  if _WORKDIR.value is None:
    raise app.UsageError("--workdir is required")
  if _COORDINATOR.value or _NUM_PROCESSES.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()
  logging.info("process %d of %d, %d devices", jax.process_index(), jax.process_count(), jax.device_count())
  try:
    train.train_and_evaluate(config, _WORKDIR.value)
  except (train.NonFiniteLossError, checkpoint.CheckpointError) as e:
    sys.exit(f"error: {e}")
  if config.after_training.evaluate and jax.process_index() == 0:
    pipeline.run(config, _WORKDIR.value)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
