"""The step loop over a `RunContext`: steps, deferred checkpoints, evaluations, step metrics."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import jax
import optax
from absl import logging

from clsalign_jax import checkpoint as ckpt_lib
from clsalign_jax import errors, losses, sharding
from clsalign_jax import metrics as metrics_lib
from clsalign_jax import model as model_lib
from clsalign_jax.train.inputs import make_data_iterator
from clsalign_jax.train.monitor import LossGuard, StepMetrics
from clsalign_jax.train.state import StateLayout, TrainState
from clsalign_jax.train.step import make_eval_step, make_train_step

if TYPE_CHECKING:
  from clsalign_jax.data.sources import TextInputs


@dataclasses.dataclass(frozen=True)
class RunContext:
  """Everything the loop needs, built once per invocation by run.py (`train_and_evaluate`)."""

  config: Any  # the validated run config: loss, mode, guard, checkpoint and eval cadence
  cfg: model_lib.ModelConfig  # the model being trained (step functions, throughput, checkpoint meta)
  tx: optax.GradientTransformation  # the optimizer the train step applies
  schedule: optax.Schedule  # the LR schedule, reported per step as `learning_rate`
  mesh: jax.sharding.Mesh  # the devices the state and batches are laid out on
  rules: tuple  # logical axis rules (config.mesh.logical_axis_rules), for the batch shardings
  layout: StateLayout  # the train state's shardings: the jitted step's in/out shardings
  shard: tuple[int, int]  # (shard_index, shard_count): this process's row block of each global batch
  inputs: TextInputs | None  # the run's tokenizer and template (None: synthetic data), reused by eval iterators
  train_iter: Any  # the training iterator, already past `first_batch`; its state goes into every checkpoint
  first_batch: dict  # the first batch of this invocation, read ahead to check it and to size the shardings
  ckpt: ckpt_lib.Checkpointer  # where steps are saved (the workdir's checkpoints/)
  writer: metrics_lib.MetricWriter  # metrics.jsonl, TensorBoard and the progress bar
  meta: dict  # saved with every step: the model config and the run config (artifacts reads them back)
  start: int  # the step the state is at (0, or the restored checkpoint's)
  num_steps: int  # the step training ends at (config.train.num_steps or the epochs' steps)
  workdir: str  # the run directory (rejected checkpoints are moved into it)


def next_batch(batches: Iterator[dict], step: int) -> dict:
  try:
    return next(batches)
  except StopIteration:
    raise ValueError(f"the training data ended before step {step}; the train split must repeat") from None


def _evaluate(ctx: RunContext, eval_fn, params, batch_shardings) -> dict:
  config = ctx.config
  it = make_data_iterator(config, config.data.eval_split, *ctx.shard, ctx.inputs)
  totals: dict[str, float] = {}
  for _, local in zip(range(config.eval.num_batches), it):
    batch = sharding.to_global_batch(local, batch_shardings, config.data.global_batch_size)
    for k, v in jax.device_get(eval_fn(params, batch)).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  n_seq = max(totals["tp"] + totals["fp"] + totals["fn"] + totals["tn"], 1.0)
  return {
    "lm_loss": totals["lm_sum"] / max(totals["lm_count"], 1.0),
    "cls_loss": totals["cls_sum"] / n_seq,
    **losses.classification_metrics(totals["tp"], totals["fp"], totals["fn"], totals["tn"]),
  }


def _step_metrics(ctx: RunContext) -> StepMetrics:
  g = ctx.config.guard
  return StepMetrics(
    ctx.writer,
    ctx.ckpt,
    ctx.cfg,
    model_lib.count_params(ctx.layout.abstract.params),
    ctx.config.data.global_batch_size,
    metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind, ctx.config.metrics.peak_flops_per_device),
    LossGuard(g.divergence_factor, g.divergence_steps, g.median_window),
    ctx.workdir,
  )


def _preempted(ctx: RunContext, step: int, saved: bool) -> errors.Preempted:
  """Waits for the step's save to be on disk, then the one line the run ends with."""
  ctx.ckpt.wait()
  if saved:
    return errors.Preempted(
      f"preempted (SIGTERM) at step {step}: saved checkpoint {step} in {ctx.ckpt.directory}; rerun the same "
      "command to resume"
    )
  newest = ctx.ckpt.latest_intact_step()
  return errors.Preempted(
    f"preempted (SIGTERM) at step {step}: not saved, the divergence guard flagged its loss; newest checkpoint: "
    + (f"step {newest} in {ctx.ckpt.directory}" if newest is not None else f"none in {ctx.ckpt.directory}")
  )


def train_loop(ctx: RunContext, state: TrainState) -> TrainState:
  """Steps `ctx.start + 1 .. ctx.num_steps` from `state`; saves and evaluates on the
  configured cadence and at the last step. A save due at a step the guard flagged waits for the
  next clean step; the last step is never saved flagged. After a preemption notice the next step
  boundary is saved and the loop raises errors.Preempted."""
  config = ctx.config
  batches = itertools.chain([ctx.first_batch], ctx.train_iter)
  replicated = jax.sharding.NamedSharding(ctx.mesh, jax.sharding.PartitionSpec())
  batch_shardings = sharding.batch_shardings(ctx.mesh, ctx.rules, ctx.first_batch)
  step_fn = jax.jit(
    make_train_step(config, ctx.cfg, ctx.tx, ctx.schedule),
    in_shardings=(ctx.layout.shardings, batch_shardings),
    out_shardings=(ctx.layout.shardings, replicated),
    donate_argnums=0,
  )
  eval_fn = jax.jit(
    make_eval_step(config, ctx.cfg),
    in_shardings=(ctx.layout.shardings.params, batch_shardings),
    out_shardings=replicated,
  )
  step_metrics = _step_metrics(ctx)
  every_ckpt, every_eval = config.checkpoint.every_steps, config.eval.every_steps
  save_due = False  # a save was due at a step the guard flagged; it happens at the next clean step
  # SIGTERM (a preemption notice) does not kill the run: the next step boundary saves that step on
  # every process and stops with one line (errors.Preempted).
  with ckpt_lib.PreemptionWatch() as preemption:
    for step in range(ctx.start + 1, ctx.num_steps + 1):
      local = next_batch(batches, step)
      state, device_metrics = step_fn(
        state, sharding.to_global_batch(local, batch_shardings, config.data.global_batch_size)
      )
      step_metrics.push(step, device_metrics, local["tokens"].shape[1])
      preempted = preemption.reached(step)
      save_due = save_due or preempted or step == ctx.num_steps or (every_ckpt > 0 and step % every_ckpt == 0)
      eval_now = not preempted and (step == ctx.num_steps or (every_eval > 0 and step % every_eval == 0))
      if not (save_due or eval_now):
        continue
      step_metrics.flush()
      if save_due and step_metrics.suspect:
        if step == ctx.num_steps:
          raise step_metrics.refuse_final_save(step)
        logging.warning("step %d: loss flagged by the divergence guard; checkpoint deferred", step)
      elif save_due:
        save_due = False
        data_state = ctx.train_iter.get_state()
        ctx.ckpt.save(step, state.params, state.opt_state, {"step": state.step, "rng": state.rng}, data_state, ctx.meta)
      if preempted:
        raise _preempted(ctx, step, saved=not save_due)
      if eval_now:
        ctx.writer.write(step, "eval", _evaluate(ctx, eval_fn, state.params, batch_shardings))
      step_metrics.reset_clock()
  ctx.ckpt.wait()
  return state
