#!/usr/bin/env bash
# Train on several GPU nodes under SLURM: srun starts one process per node, each seeing all of
# its node's GPUs, and every process gets what jax.distributed needs from SLURM: the coordinator
# (the first node of the job step), the process count and its own rank.
#
#   launch/gpu_multihost.sh --nodes=2 --workdir=/shared/runs/llama7b_cls --partition=a3 \
#       -- --config.init_from=hf:/shared/models/Llama-2-7b-hf --config.mesh.tensor=2
#
# From a login node srun allocates the nodes itself; inside an sbatch or salloc allocation it
# uses the allocated ones. The workdir, this checkout and its virtual environment must be on a
# file system every node sees (NFS, Lustre, ...): all processes write one checkpoint directory.
# Re-running the same command resumes from the newest checkpoint in the workdir.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
  cat <<'EOF'
Usage: launch/gpu_multihost.sh --nodes=N --workdir=DIR [options] [-- extra clsalign_jax.main flags]
  --nodes=N            nodes, one training process each
  --workdir=DIR        run directory on a shared file system
  --config=FILE        training config, relative to this checkout (default configs/llama7b_sft.py)
  --gpus_per_node=G    GPUs per node (default 8)
  --partition=P --account=A --time=HH:MM:SS    passed to srun when given
  --venv=DIR           virtual environment every node activates (default: this checkout's .venv)
  --port=PORT          coordinator port (default: 20000 + SLURM job id mod 20000)
  --dry_run            print the command instead of running it
EOF
}

die() {
  echo "gpu_multihost.sh: $*" >&2
  exit 2
}

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
nodes="" workdir="" config="configs/llama7b_sft.py" gpus_per_node=8
partition="" account="" time_limit="" venv="$repo/.venv" port=""
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes=*) nodes=${1#*=} ;;
    --workdir=*) workdir=${1#*=} ;;
    --config=*) config=${1#*=} ;;
    --gpus_per_node=*) gpus_per_node=${1#*=} ;;
    --partition=*) partition=${1#*=} ;;
    --account=*) account=${1#*=} ;;
    --time=*) time_limit=${1#*=} ;;
    --venv=*) venv=${1#*=} ;;
    --port=*) port=${1#*=} ;;
    --dry_run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done

[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer (got '$nodes')"
[[ "$gpus_per_node" =~ ^[1-9][0-9]*$ ]] || die "--gpus_per_node must be a positive integer (got '$gpus_per_node')"
[ -n "$workdir" ] || die "--workdir is required"
[ -z "$port" ] || [[ "$port" =~ ^[1-9][0-9]*$ ]] || die "--port must be a number (got '$port')"
# Every process runs from the checkout, so a relative --config means one of its files, while a
# relative --workdir means what it means here.
case "$workdir" in
  /*) ;;
  *) workdir="$PWD/$workdir" ;;
esac

srun_args=(srun "--nodes=$nodes" --ntasks-per-node=1 "--gpus-per-node=$gpus_per_node" --kill-on-bad-exit=1
           --job-name=clsalign)
[ -z "$partition" ] || srun_args+=("--partition=$partition")
[ -z "$account" ] || srun_args+=("--account=$account")
[ -z "$time_limit" ] || srun_args+=("--time=$time_limit")

# The default port comes from the job id, so that two jobs sharing a first node do not collide.
# shellcheck disable=SC2016
[ -n "$port" ] || port='$((20000 + SLURM_JOB_ID % 20000))'
# Runs once per node; the quoted $SLURM_* and $(...) are expanded there. sed, not head: head
# would close the pipe early and pipefail would stop the task.
# shellcheck disable=SC2016
task='set -euo pipefail
coordinator=$(scontrol show hostnames "$SLURM_STEP_NODELIST" | sed -n 1p)
port='"$port"'
source '"$(quote "$venv/bin/activate")"'
cd '"$(quote "$repo")"'
exec '"$(quote python -m clsalign_jax.main "--config=$config" "--workdir=$workdir")"' \
  --coordinator_address="$coordinator:$port" --num_processes="$SLURM_NTASKS" --process_id="$SLURM_PROCID"'
if [ ${#extra[@]} -gt 0 ]; then
  task+=" $(quote "${extra[@]}")"
fi

run "${srun_args[@]}" bash -c "$task"
