"""`python -m clsalign_jax.evaluate --config=configs/eval_<name>.py [--config.key=value ...]`.

Runs every variant × attack × benchmark cell of the config (resuming: finished cells are
skipped), judges the generations, and writes the tables and plots; see `eval/harness.py`.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from clsalign_jax.eval import harness

_CONFIG = config_flags.DEFINE_config_file("config", None, "Evaluation config file (configs/eval_*.py).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  harness.run(_CONFIG.value)


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main)
