#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: create the slice, install the package on every worker,
# mount the run's bucket path on every worker, and run the same training command on all of
# them with multi-host initialisation (jax.distributed detects a TPU pod by itself).
#
#   launch/tpu_pod.sh --name=cls-v5p --zone=us-east5-a --accelerator_type=v5p-16 \
#       --repo=https://github.com/<owner>/clsalign-jax.git \
#       --bucket=gs://my-bucket/runs/llama7b_cls --config=configs/llama7b_sft.py \
#       -- --config.init_from=hf:/tmp/Llama-2-7b-hf
#
# The TPU VM images ship Python 3.10 (Ubuntu 22.04); the pinned set needs >= 3.11, so every worker
# gets uv and a uv-managed Python 3.11 virtual environment in ~/clsalign-venv.
#
# Every process reads the whole init_from checkpoint, so it must be on every worker (copy it there
# first; docs/reproduce_7b.md shows how).
#
# The run directory (config.json, metrics.jsonl, tb/, checkpoints/) is the --bucket path itself:
# every worker mounts it with Cloud Storage FUSE, because a multi-host orbax checkpoint is written
# by all processes into one directory that they all see, so it cannot be assembled afterwards from
# per-worker disks. Re-running the same command resumes from the newest checkpoint there.
# Run it inside tmux or screen: training lasts as long as the ssh session to the workers.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

# Python of the workers' environment (uv downloads it; the images' own python3 is 3.10).
PYTHON_VERSION=3.11
# Expanded by the workers' shell, in their home directory.
# shellcheck disable=SC2088
VENV='~/clsalign-venv'

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh --name=NAME --zone=ZONE --accelerator_type=TYPE --bucket=gs://BUCKET/PATH
                         [options] [-- extra clsalign_jax.main flags]
  --name=NAME              TPU VM name
  --zone=ZONE              e.g. us-central2-b (v4), us-east5-a (v5p)
  --accelerator_type=TYPE  e.g. v4-16, v5litepod-16 (v5e), v5p-16, v6e-16
  --bucket=gs://B/PATH     the run directory; mounted on every worker at --mount
  --config=FILE            training config (default configs/llama7b_sft.py)
  --project=ID             gcloud project (default: gcloud's configured project)
  --repo=URL               git clone URL the workers install from (required; default $CLSALIGN_REPO_URL)
  --ref=REF                branch or tag to install (default main)
  --runtime_version=V      TPU software version (default from the accelerator generation, Google's table:
                           v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
                           v6e v2-alpha-tpuv6e)
  --mount=DIR              mount point of the bucket path on the workers (default /mnt/clsalign)
  --skip_create            the TPU VM exists already
  --delete                 delete the TPU VM when training ends
  --dry_run                print the commands instead of running them
EOF
}

die() {
  echo "tpu_pod.sh: $*" >&2
  exit 2
}

name="" zone="" accelerator_type="" bucket="" project="" runtime_version=""
config="configs/llama7b_sft.py" repo="${CLSALIGN_REPO_URL:-}" ref="main" mount="/mnt/clsalign"
skip_create=0 delete=0
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name=*) name=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --accelerator_type=*) accelerator_type=${1#*=} ;;
    --bucket=*) bucket=${1#*=} ;;
    --config=*) config=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --runtime_version=*) runtime_version=${1#*=} ;;
    --repo=*) repo=${1#*=} ;;
    --ref=*) ref=${1#*=} ;;
    --mount=*) mount=${1#*=} ;;
    --skip_create) skip_create=1 ;;
    --delete) delete=1 ;;
    --dry_run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
  shift
done

[ -n "$name" ] || die "--name is required"
[ -n "$zone" ] || die "--zone is required"
[ -n "$accelerator_type" ] || die "--accelerator_type is required"
[ -n "$repo" ] || die "--repo=URL is required: the git clone URL of this repository (or a fork) that the workers install from (or set CLSALIGN_REPO_URL)"
case "$bucket" in
  gs://?*/?*) ;;
  *) die "--bucket must be gs://BUCKET/PATH (got '$bucket')" ;;
esac
if [ -z "$runtime_version" ]; then
  # Google's "TPU software versions" table for JAX (cloud.google.com/tpu/docs/runtimes).
  case "$accelerator_type" in
    v6e-*) runtime_version=v2-alpha-tpuv6e ;;
    v5p-*) runtime_version=v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) runtime_version=v2-alpha-tpuv5-lite ;;
    v4-* | v3-* | v2-*) runtime_version=tpu-ubuntu2204-base ;;
    *) die "no default TPU software version for --accelerator_type=$accelerator_type; pass --runtime_version" ;;
  esac
fi
bucket_path=${bucket#gs://}
bucket_name=${bucket_path%%/*}
bucket_dir=${bucket_path#*/}

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=("--zone=$zone")
[ -z "$project" ] || where+=("--project=$project")
on_all_workers=("${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command)

# Runs on every worker. The quoted $(...) and ~ are expanded there, not here.
# shellcheck disable=SC2016
install_gcsfuse='command -v gcsfuse >/dev/null || {
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo gpg --batch --yes --dearmor -o /usr/share/keyrings/cloud.google.gpg
  echo "deb [signed-by=/usr/share/keyrings/cloud.google.gpg] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -cs) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list
  sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
}'
# shellcheck disable=SC2016
checkout="if [ -d ~/clsalign-jax/.git ]; then
  git -C ~/clsalign-jax fetch --depth=1 origin $(quote "$ref") && git -C ~/clsalign-jax checkout --force FETCH_HEAD
else
  git clone --depth=1 --branch=$(quote "$ref") $(quote "$repo") ~/clsalign-jax
fi"
# uv from PyPI with the image's pip (user site), then a uv-managed Python in its own venv.
# shellcheck disable=SC2016
install="python3 -m pip install --quiet --user uv
export PATH=\"\$HOME/.local/bin:\$PATH\"
[ -x $VENV/bin/python ] || uv venv --python $PYTHON_VERSION $VENV
uv pip install --quiet --python $VENV/bin/python -c ~/clsalign-jax/requirements/constraints.txt -e ~/clsalign-jax 'jax[tpu]'
$VENV/bin/python -c 'import sys; assert sys.version_info >= (3, 11), sys.version'"
# rename-dir-limit: orbax finalises a checkpoint by renaming its temporary step directory.
mount_bucket="sudo mkdir -p $(quote "$mount") && sudo chown \"\$USER\" $(quote "$mount")
mountpoint -q $(quote "$mount") || gcsfuse --implicit-dirs --rename-dir-limit=200000 --only-dir=$(quote "$bucket_dir") $(quote "$bucket_name" "$mount")"
setup="set -euo pipefail
$install_gcsfuse
$checkout
$install
$mount_bucket"

# Every process resolves a relative --config against the checkout.
train_args=(-m clsalign_jax.main "--config=$config" "--workdir=$mount" --distributed "${extra[@]}")
train="cd ~/clsalign-jax && $VENV/bin/python $(quote "${train_args[@]}")"

if [ "$skip_create" = 0 ]; then
  run "${gcloud_tpu[@]}" create "$name" "${where[@]}" "--accelerator-type=$accelerator_type" "--version=$runtime_version"
fi
run "${on_all_workers[@]}" "$setup"
run "${on_all_workers[@]}" "$train"
run gcloud storage ls "$bucket/checkpoints/"
if [ "$delete" = 1 ]; then
  run "${gcloud_tpu[@]}" delete "$name" "${where[@]}" --quiet
fi
