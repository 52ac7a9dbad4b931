"""Training: `train_and_evaluate(config, workdir)` and what it is built from, one module per concern.

  optimizer.py  LR schedule, the optax chain (AdamW, clipping, the CLS head's LR scale, moment dtype),
                the trainable subset (`ParamPartition`)
  inputs.py     `init_from` parsed once (`InitFrom`), the tokenizer and template resolved once, and
                `make_data_iterator`, the one place a data source is chosen
  state.py      `TrainState`, its shardings, a fresh start (random or `init_from` weights), restore
  step.py       the jitted train and eval steps and the loss sums they are built from; `view_logits`
  monitor.py    step metrics (fetched one step late), the divergence guard, the errors that stop a run
  loop.py       `RunContext` and the step loop: steps, deferred checkpoints, evaluations
  run.py        `train_and_evaluate`: builds the run context once and runs the loop
  dry_run.py    `dry_run`: parameter count and per-device memory, nothing allocated

Loss (docs/method.md §4.1; masks §2.1):
  sft       L = L_sft + λ·BCE(cls)   L_sft: token cross-entropy on response + EOS targets, averaged
                                      over the supervised tokens of the whole (global) batch
  pretrain  L = L_lm + λ·BCE(cls)    L_lm: every in-segment next token, CLS row excluded
BCE is averaged over the sequences of the batch. Both terms are built from sums, so the
result does not depend on how the batch is split over devices or accumulation steps.
"""

from clsalign_jax.lock import workdir_lock
from clsalign_jax.train.dry_run import dry_run
from clsalign_jax.train.inputs import InitFrom, make_data_iterator, resolve_text_inputs, with_tokenizer
from clsalign_jax.train.loop import RunContext, train_loop
from clsalign_jax.train.monitor import (
  REJECTED_DIR,
  DivergenceError,
  LossGuard,
  NonFiniteLossError,
  StepMetrics,
)
from clsalign_jax.train.optimizer import ParamPartition, make_optimizer, make_schedule, with_state_dtype
from clsalign_jax.train.run import train_and_evaluate
from clsalign_jax.train.state import (
  CORRUPT_DIR,
  StateLayout,
  TrainState,
  fresh_state,
  load_init_params,
  restore_latest,
  state_layout,
)
from clsalign_jax.train.step import make_eval_step, make_train_step, view_logits

# The names these had when training was one module (tests build layouts and load init weights).
_layout = state_layout
_load_init_params = load_init_params

__all__ = [
  "CORRUPT_DIR",
  "REJECTED_DIR",
  "DivergenceError",
  "InitFrom",
  "LossGuard",
  "NonFiniteLossError",
  "ParamPartition",
  "RunContext",
  "StateLayout",
  "StepMetrics",
  "TrainState",
  "dry_run",
  "fresh_state",
  "load_init_params",
  "make_data_iterator",
  "make_eval_step",
  "make_optimizer",
  "make_schedule",
  "make_train_step",
  "resolve_text_inputs",
  "restore_latest",
  "state_layout",
  "train_and_evaluate",
  "train_loop",
  "view_logits",
  "with_state_dtype",
  "with_tokenizer",
  "workdir_lock",
]
