"""`train_and_evaluate`: the entry. It builds the run context once (config, mesh, the state restored
or started fresh, `init_from` resolved once with its tokenizer and template, the iterators, the
checkpoint manager, the metrics writer) and runs the loop (loop.py) over it."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import numpy as np
import optax
from absl import logging

from clsalign_jax import artifacts, files, sharding
from clsalign_jax import checkpoint as ckpt_lib
from clsalign_jax import config as config_lib
from clsalign_jax import metrics as metrics_lib
from clsalign_jax import model as model_lib
from clsalign_jax.lock import workdir_lock
from clsalign_jax.train import loop
from clsalign_jax.train.inputs import InitFrom, make_data_iterator, resolve_text_inputs
from clsalign_jax.train.optimizer import ParamPartition, make_optimizer, make_schedule
from clsalign_jax.train.state import CORRUPT_DIR, StateLayout, TrainState, fresh_state, restore_latest, state_layout

if TYPE_CHECKING:
  from clsalign_jax.data.sources import TextInputs


@dataclasses.dataclass(frozen=True)
class _Plan:
  """What the config alone fixes, worked out before the workdir is locked."""

  config: Any  # the validated run config
  cfg: model_lib.ModelConfig  # the model it trains
  num_steps: int  # the step training ends at
  mesh: jax.sharding.Mesh  # the devices, laid out by config.mesh
  rules: tuple  # logical axis rules (config.mesh.logical_axis_rules)
  schedule: optax.Schedule  # the LR schedule over num_steps
  tx: optax.GradientTransformation  # the optimizer


@dataclasses.dataclass(frozen=True)
class _Start:
  """Where this invocation starts, found without writing anything."""

  state: TrainState  # restored from the newest usable checkpoint, else fresh (init_from or random)
  layout: StateLayout  # the state's shardings
  shard: tuple[int, int]  # (shard_index, shard_count): this process's row block of each global batch
  inputs: TextInputs | None  # tokenizer and template, resolved once (None: synthetic data)
  train_iter: Any  # the training iterator, at the restored data position
  corrupted: list[int]  # newer corrupted steps skipped (checkpoint.fallback_to_intact), moved aside once writing


def train_and_evaluate(config, workdir: str, devices: Sequence[jax.Device] | None = None) -> TrainState:
  """Train until `total_steps(config)`, resuming from `workdir` when it holds a checkpoint.

  `devices` (default: all) are the devices the mesh is built from. Returns the final state.
  Holds the workdir lock throughout. Nothing is written into `workdir` until the config, the
  checkpoint (digests, architecture, restore) or the init weights have been checked, so a refused
  invocation leaves it as it was.
  """
  config_lib.validate(config)
  cfg = config_lib.model_config(config)
  num_steps = config_lib.total_steps(config)
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = tuple(tuple(rule) for rule in config.mesh.logical_axis_rules)
  schedule = make_schedule(config, num_steps)
  plan = _Plan(config, cfg, num_steps, mesh, rules, schedule, make_optimizer(config, schedule))
  with workdir_lock(workdir, enabled=jax.process_index() == 0):
    return _train_and_evaluate(plan, workdir)


def _train_and_evaluate(plan: _Plan, workdir: str) -> TrainState:
  # Axis rules are active only while the step functions are traced: unboxing and init would
  # otherwise apply activation constraints to trees and dummy batches they do not fit.
  partition = ParamPartition(plan.config, plan.cfg)
  with jax.set_mesh(plan.mesh):
    directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    start = _find_start(plan, partition, directory)
    step = int(start.state.step)
    if step >= plan.num_steps:
      print(f"training is complete: checkpoint at step {step} of {plan.num_steps} in {directory}", flush=True)
      return start.state

    # The checks that need more than the checkpoint, still read-only: the first batch (the data
    # pipeline checks its input when it is first read), the metrics a resume keeps, the run facts
    # (the template resolved with the tokenizer), where corrupted steps go.
    first = _first_batch(start.train_iter, step)
    facts = _check_workdir(plan.config, workdir, start, step)
    # Everything is checked: from here on the run writes.
    _write_metadata(plan.config, workdir, facts)
    ckpt = ckpt_lib.Checkpointer(
      directory,
      keep=plan.config.checkpoint.keep,
      async_save=plan.config.checkpoint.async_save,
      allow_unverified=plan.config.checkpoint.allow_unverified,
    )
    try:
      for corrupt in start.corrupted:
        logging.warning(
          "moved corrupted checkpoint to %s", ckpt.move_aside(corrupt, os.path.join(workdir, CORRUPT_DIR))
        )
      with nn.logical_axis_rules(plan.rules):
        return _run_loop(plan, start, ckpt, workdir, first)
    finally:
      ckpt.close()


def _check_micro_batch(config, mesh, rules) -> None:
  micro = config.data.global_batch_size // config.train.grad_accum_steps
  if micro % sharding.batch_shard_count(mesh, rules):
    raise ValueError(
      f"micro-batch of {micro} sequences does not split over the "
      f"{sharding.batch_shard_count(mesh, rules)} batch shards of mesh {dict(mesh.shape)}; "
      "change config.mesh, data.global_batch_size or train.grad_accum_steps"
    )


def _find_start(plan: _Plan, partition: ParamPartition, directory: str) -> _Start:
  """The state this invocation starts from: the newest usable checkpoint in `directory`, else a
  fresh one. `init_from` is parsed here at most once, for its tokenizer and for its weights."""
  config, cfg = plan.config, plan.cfg
  layout = state_layout(cfg, plan.tx, plan.mesh, plan.rules, partition)
  _check_micro_batch(config, plan.mesh, plan.rules)
  shard = sharding.process_batch_block(plan.mesh, plan.rules, config.data.global_batch_size)
  init = InitFrom(config.init_from)
  inputs = resolve_text_inputs(config, cfg, init)
  train_iter = make_data_iterator(config, "train", *shard, inputs)
  state, corrupted = restore_latest(config, cfg, layout, directory, train_iter)
  if state is None:
    state = fresh_state(config, cfg, plan.tx, layout, partition, init)
  return _Start(state, layout, shard, inputs, train_iter, corrupted)


def _check_workdir(config, workdir: str, start: _Start, step: int) -> artifacts.RunFacts | None:
  """What process 0 checks in the workdir before writing: metrics.jsonl (a bad line that is not
  the last refuses the run), where corrupted steps are to be moved; returns the run facts to
  write (None on other processes)."""
  if jax.process_index() != 0:
    return None
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(metrics_path):
    metrics_lib.kept_jsonl_lines(metrics_path, step, warn=False)
  aside = os.path.join(workdir, CORRUPT_DIR)
  if start.corrupted and os.path.exists(aside) and not os.path.isdir(aside):
    raise ckpt_lib.CheckpointError(
      f"{aside}: exists and is not a directory, so the corrupted steps {start.corrupted} cannot be moved "
      "there; move it away, then rerun"
    )
  inputs = start.inputs
  tokenizer, template = (inputs.tokenizer_spec, inputs.template) if inputs else (None, None)
  return artifacts.run_facts_of(config, workdir, tokenizer=tokenizer, template=template)


def _write_metadata(config, workdir: str, facts: artifacts.RunFacts | None) -> None:
  """config.json, and the run facts that generate, convert and evaluation must use this run with
  (template, tokenizer, CLS facts), written by process 0 with the tokenizer and template resolved."""
  if jax.process_index() != 0:
    return
  files.atomic_write(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2) + "\n")
  artifacts.write_facts(workdir, facts)


def _first_batch(train_iter, start: int) -> dict:
  first = loop.next_batch(train_iter, start + 1)
  if np.ndim(first["cls_label"]) != 1 and "view_window" not in first:  # views batches: [B, K] labels
    raise ValueError(
      "packed rows (several examples per row) are not supported: the model reads one "
      "[CLS] per row; turn packing off in the data config"
    )
  return first


def _run_meta(config, cfg: model_lib.ModelConfig) -> dict:
  return {"model_config": dataclasses.asdict(cfg), "config": json.loads(config.to_json_best_effort())}


def _run_loop(plan: _Plan, start: _Start, ckpt: ckpt_lib.Checkpointer, workdir: str, first: dict) -> TrainState:
  step = int(start.state.step)
  writer = metrics_lib.MetricWriter(workdir, step, plan.num_steps, plan.config.metrics.progress_bar)
  try:
    ctx = loop.RunContext(
      config=plan.config,
      cfg=plan.cfg,
      tx=plan.tx,
      schedule=plan.schedule,
      mesh=plan.mesh,
      rules=plan.rules,
      layout=start.layout,
      shard=start.shard,
      inputs=start.inputs,
      train_iter=start.train_iter,
      first_batch=first,
      ckpt=ckpt,
      writer=writer,
      meta=_run_meta(plan.config, plan.cfg),
      start=step,
      num_steps=plan.num_steps,
      workdir=workdir,
    )
    return loop.train_loop(ctx, start.state)
  finally:
    writer.close()
