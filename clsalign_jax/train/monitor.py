"""Watching the steps: metrics fetched one step late and written, the divergence guard, and the
errors that stop a run before a broken state is saved."""

from __future__ import annotations

import math
import os
import time

import jax
import numpy as np

from clsalign_jax import errors
from clsalign_jax import metrics as metrics_lib

# Workdir subdirectory for step directories saved from a state that went on to a non-finite or
# diverging loss (moved out of `checkpoints/`, kept, never deleted).
REJECTED_DIR = "rejected_checkpoints"


class NonFiniteLossError(errors.TrainingStopped, FloatingPointError):
  """Loss or gradient norm became NaN/inf; the run stops before saving the broken state."""


class DivergenceError(errors.TrainingStopped):
  """The loss stayed above `guard.divergence_factor` × its running median for
  `guard.divergence_steps` steps; the run stops before saving the diverged state."""


class LossGuard:
  """Divergence guard: a step is flagged when its loss exceeds `factor` × the median of the last
  `window` unflagged losses (from the second step of an invocation on, so a run that blows up at
  once is caught too) and by more than 1 nat; `patience` flagged steps in a row stop the run.
  factor 0 turns it off."""

  def __init__(self, factor: float, patience: int, window: int):
    self.factor, self.patience, self.window = factor, patience, window
    self.history: list[float] = []
    self.flagged = 0  # consecutive flagged steps so far
    self.first_flagged: int | None = None
    self.median = math.nan

  def observe(self, step: int, loss: float) -> bool:
    """Records one step's loss; True if that step is flagged."""
    if self.factor > 0 and self.history:
      self.median = float(np.median(self.history[-self.window :]))
      # The 1-nat margin keeps a run that has converged to a tiny loss from stopping on batch noise.
      if loss > self.factor * self.median and loss > self.median + 1.0:
        self.flagged += 1
        self.first_flagged = step if self.flagged == 1 else self.first_flagged
        return True
    self.flagged, self.first_flagged = 0, None
    self.history = self.history[-self.window :] + [loss]
    return False

  @property
  def tripped(self) -> bool:
    return self.flagged >= self.patience


class StepMetrics:
  """Fetches step k's metrics only after step k+1 is dispatched, so the host never idles the
  device; adds throughput, writes them, and stops the run on a non-finite or diverging loss.
  Checkpoint and eval steps `flush()` first, so a flagged step is never saved."""

  def __init__(
    self, writer, ckpt, cfg, n_params: int, global_batch: int, peak_flops: float | None, guard: LossGuard, workdir: str
  ):
    self.writer, self.ckpt, self.cfg, self.n_params = writer, ckpt, cfg, n_params
    self.global_batch, self.peak_flops = global_batch, peak_flops
    self.guard, self.workdir = guard, workdir
    self.pending = None
    self.last_time = None
    self.suspect = False  # the last flushed step's loss is flagged by the guard

  def push(self, step: int, device_metrics: dict, seq_len: int) -> None:
    self.flush()
    self.pending = (step, device_metrics, seq_len)

  def reset_clock(self) -> None:
    """Call after work that is not a training step (saving, eval), so it is not counted as one."""
    self.last_time = None

  def _add_throughput(self, values: dict, seq_len: int) -> None:
    now = time.perf_counter()
    if self.last_time is not None:  # the first step of a run also pays for compilation
      dt = now - self.last_time
      values["step_time"] = dt
      values["tokens_per_sec"] = self.global_batch * seq_len / dt
      if self.peak_flops:
        flops = self.global_batch * metrics_lib.train_flops_per_sequence(self.cfg, self.n_params, seq_len)
        values["mfu"] = flops / (dt * jax.device_count() * self.peak_flops)
    self.last_time = now

  def flush(self) -> None:
    if self.pending is None:
      return
    step, device_metrics, seq_len = self.pending
    self.pending = None
    values = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    self._add_throughput(values, seq_len)
    self.writer.write(step, "train", values)
    loss = values["loss"]
    if not (math.isfinite(loss) and math.isfinite(values["grad_norm"])):
      raise NonFiniteLossError(
        f"step {step}: loss={loss} grad_norm={values['grad_norm']} is not finite; training "
        f"stopped without saving. {self.last_good(self.guard.first_flagged or step)}"
      )
    self.suspect = self.guard.observe(step, loss)
    if self.guard.tripped:
      g = self.guard
      raise DivergenceError(
        f"step {step}: loss={loss:.4g} has been above {g.factor:g} x its running median {g.median:.4g} for "
        f"{g.patience} steps (config.guard.divergence_factor, config.guard.divergence_steps); training stopped "
        f"without saving. {self.last_good(g.first_flagged)}"
      )

  def refuse_final_save(self, step: int) -> DivergenceError:
    """The error for a last step whose loss the guard flagged: it is not saved."""
    return DivergenceError(
      f"step {step}: the last step's loss is above {self.guard.factor:g} x its running median "
      f"{self.guard.median:.4g}; not saving it. {self.last_good(self.guard.first_flagged or step)}"
    )

  def last_good(self, first_bad: int) -> str:
    """Step `first_bad`'s loss was computed from the state after step first_bad - 1, so a checkpoint
    of that step or later holds a broken state: move those aside, then name the newest intact one."""
    self.ckpt.wait()
    moved = [s for s in self.ckpt.all_steps() if s >= first_bad - 1]
    for s in moved:
      self.ckpt.move_aside(s, os.path.join(self.workdir, REJECTED_DIR))
    note = f" (moved step(s) {moved} saved after the loss went bad to {self.workdir}/{REJECTED_DIR})" if moved else ""
    good = self.ckpt.latest_intact_step()
    where = (
      f"step {good} in {self.ckpt.directory}"
      if good is not None
      else f"none (no step was saved in {self.ckpt.directory} before the loss went bad)"
    )
    return f"Last good checkpoint: {where}{note}"
