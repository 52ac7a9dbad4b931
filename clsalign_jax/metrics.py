"""Throughput accounting, the three metric sinks (TensorBoard events, JSONL, progress bar) and the
classifier metrics every report shares (`auc`).

Light to import (jax and tqdm load with the first MetricWriter): the data tools use `auc` too."""

from __future__ import annotations

import json
import math
import os
import time
from typing import TYPE_CHECKING

import numpy as np
from absl import logging

from clsalign_jax import files

if TYPE_CHECKING:
  from clsalign_jax.model import ModelConfig

# bf16 dense matmul peak per device, by a substring of `jax.Device.device_kind`.
PEAK_FLOPS = (
  ("TPU v6", 918e12),
  ("TPU v5p", 459e12),
  ("TPU v5", 197e12),  # v5e reports "TPU v5 lite"
  ("TPU v4", 275e12),
  ("H200", 989e12),
  ("H100", 989e12),
  ("A100", 312e12),
  ("A6000", 155e12),
  ("L4", 121e12),
)


def peak_flops_per_device(device_kind: str, configured: float = 0.0) -> float | None:
  """The configured peak, else the table's; None where unknown (CPU), so no MFU is reported."""
  if configured > 0:
    return configured
  for name, flops in PEAK_FLOPS:
    if name in device_kind:
      return flops
  return None


def matmul_params(cfg: ModelConfig, n_params: int) -> int:
  """Parameters that take part in a matmul per token: the input-embedding lookup and the CLS
  row are gathers, but a tied embedding is also the LM head."""
  lookup = cfg.vocab_size * cfg.d_model + cfg.d_model
  return n_params - lookup + (cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0)


def train_flops_per_sequence(cfg: ModelConfig, n_params: int, seq_len: int) -> float:
  """Model FLOPs of forward + backward for one sequence of `seq_len` positions:

      6 · N_matmul · T                       dense layers (2 forward + 4 backward per MAC)
    + 12 · L · n_heads · head_dim · T²       attention scores and weighted values

  The attention term counts the full T×T matrix because the masked (eager) attention computes
  all of it. Rematerialisation is not counted: MFU measures model FLOPs, not hardware FLOPs.
  """
  dense = 6.0 * matmul_params(cfg, n_params) * seq_len
  attention = 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len**2
  return dense + attention


def auc(score, y) -> float:
  """Area under the ROC curve of `score` for labels `y` (1 = positive), ties counting half; NaN
  without both classes. The rank-sum count, exact: for each positive, the negatives below it plus
  half of those equal to it, found by binary search in the sorted negatives."""
  score, y = np.asarray(score, np.float64), np.asarray(y)
  pos, neg = score[y == 1], np.sort(score[y == 0])
  if len(pos) == 0 or len(neg) == 0:
    return float("nan")
  below = np.searchsorted(neg, pos, side="left")
  equal = np.searchsorted(neg, pos, side="right") - below
  return float((below.sum() + 0.5 * equal.sum()) / (len(pos) * len(neg)))


def kept_jsonl_lines(path: str, start_step: int, warn: bool = True) -> list[str]:
  """The records of a metrics.jsonl up to `start_step` (what a resumed run keeps), without
  writing: training calls it before it writes anything, so a bad line refuses the run untouched."""
  with open(path) as f:
    lines = f.read().split("\n")
  kept = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      step = record["step"]
    except (ValueError, KeyError, TypeError) as e:
      if not any(rest.strip() for rest in lines[number:]):
        # A run killed mid-write leaves a torn last record; it is past the checkpoint anyway.
        if warn:
          logging.warning("%s:%d: dropped a torn last line (%s)", path, number, e)
        continue
      raise ValueError(f"{path}:{number}: not a metrics record ({e}); fix or remove that line") from None
    if step <= start_step:
      kept.append(line + "\n")
  return kept


class MetricWriter:
  """Writes scalars from process 0 only; on resume, forgets records past the restored step."""

  def __init__(self, workdir: str, start_step: int, total_steps: int, progress_bar: bool):
    import jax  # noqa: PLC0415 - see the module docstring
    import tqdm  # noqa: PLC0415

    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
    self._truncate_jsonl(start_step)
    self.jsonl = open(self.jsonl_path, "a")
    # Imported here: tensorboardX pulls in torch when it is installed, which costs seconds.
    from tensorboardX import SummaryWriter

    # purge_step makes TensorBoard hide events a killed run wrote after the restored step.
    self.tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=start_step + 1 if start_step else None)
    self.bar = tqdm.tqdm(
      total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, disable=not progress_bar
    )

  def _truncate_jsonl(self, start_step: int) -> None:
    if os.path.exists(self.jsonl_path):
      files.atomic_write(self.jsonl_path, "".join(kept_jsonl_lines(self.jsonl_path, start_step)))

  def write(self, step: int, split: str, scalars: dict) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self.jsonl.write(json.dumps({"step": step, "split": split, "time": time.time(), **scalars}) + "\n")
    self.jsonl.flush()
    for k, v in scalars.items():
      if math.isfinite(v):
        self.tb.add_scalar(f"{split}/{k}", v, step)
    if split == "train":
      self.bar.update(step - self.bar.n)
      self.bar.set_postfix(loss=f"{scalars['loss']:.4f}", cls_acc=f"{scalars['cls_accuracy']:.3f}", refresh=False)
    else:
      self.bar.write(f"step {step} {split}: " + " ".join(f"{k}={v:.4g}" for k, v in scalars.items()))

  def close(self) -> None:
    if not self.enabled:
      return
    self.bar.close()
    self.jsonl.close()
    self.tb.close()
