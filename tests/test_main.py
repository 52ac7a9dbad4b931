import struct
import sys
import time

from train_utils import checkpoint_steps, compilation_cache, main_command, read_metrics, run, subprocess_env


def _tensorboard_scalars(workdir) -> set[str]:
  """Scalar tags in the TFRecord-framed event files (length, crc, payload, crc)."""
  from tensorboardX.proto import event_pb2

  tags = set()
  for path in (workdir / "tb").glob("events.out.tfevents.*"):
    data = path.read_bytes()
    offset = 0
    while offset < len(data):
      (length,) = struct.unpack("<Q", data[offset : offset + 8])
      event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
      tags.update(v.tag for v in event.summary.value)
      offset += 12 + length + 4
  return tags


def test_tiny_run_then_identical_invocation_reports_complete(tmp_path, tmp_path_factory, record_figure):
  env = subprocess_env(compilation_cache(tmp_path_factory))
  start = time.monotonic()
  first = run(main_command("tiny", tmp_path), env, timeout=120)
  elapsed = time.monotonic() - start
  assert first.returncode == 0, first.stderr[-5000:]
  assert elapsed < 120
  record_figure("tiny CLI run, 20 steps (s)", elapsed)

  assert (tmp_path / "config.json").exists()
  assert checkpoint_steps(tmp_path) == [10, 20]
  train, evals = read_metrics(tmp_path), read_metrics(tmp_path, "eval")
  assert sorted(train) == list(range(1, 21)) and sorted(evals) == [10, 20]
  for key in ("loss", "lm_loss", "cls_loss", "cls_accuracy", "grad_norm", "learning_rate"):
    assert key in train[1]
  assert "tokens_per_sec" in train[20] and "step_time" in train[20]
  assert {"cls_accuracy", "cls_precision", "cls_recall", "cls_f1", "lm_loss"} <= set(evals[20])
  assert train[20]["loss"] < train[1]["loss"]
  assert {"train/loss", "train/cls_accuracy", "eval/cls_f1"} <= _tensorboard_scalars(tmp_path)

  again = run(main_command("tiny", tmp_path), env, timeout=120)
  assert again.returncode == 0, again.stderr[-5000:]
  assert "training is complete: checkpoint at step 20 of 20" in again.stdout
  assert checkpoint_steps(tmp_path) == [10, 20]
  assert sorted(read_metrics(tmp_path)) == list(range(1, 21))


def test_dry_run_counts_llama7b_parameters_without_allocating(tmp_path_factory):
  result = run(
    [
      sys.executable,
      "-m",
      "clsalign_jax.main",
      "--config=configs/llama7b_sft.py",
      "--dry_run",
      "--dry_run_devices=32",
      "--config.mesh.tensor=4",
    ],
    subprocess_env(compilation_cache(tmp_path_factory)),
    timeout=120,
  )
  assert result.returncode == 0, result.stderr[-5000:]
  # Llama-2-7B has 6,738,415,616 parameters; the CLS row adds 4096 and the head 4096 + 1.
  assert "parameters: 6,738,423,809" in result.stdout
  assert "mesh: 32 devices = data 1 x fsdp 8 x tensor 4" in result.stdout
  per_device = next(line for line in result.stdout.splitlines() if line.startswith("per device:"))
  for part in ("params 0.39 GiB", "optimizer 1.57 GiB", "activations ~"):
    assert part in per_device
