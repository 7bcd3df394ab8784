#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice (v4-32, v5e-16, ...): one process per TPU host, all running
# the same `python -m dfer_clip_jax.main ...`; jax.distributed finds the other hosts itself.
#
#   TPU_NAME=dfer-v4-32 ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 \
#   RUNTIME_VERSION=tpu-ubuntu2204-base BUCKET=my-bucket RUN_DIR=runs/dfew_fold1 \
#   launch/tpu_pod.sh --create -- --config=configs/dfew.py:fold=1,variant=B/16 \
#       --config.clip.checkpoint=/mnt/gcs/my-bucket/clip/vit-b-16 \
#       --config.data.source=packed --config.data.packed_dir=/mnt/gcs/my-bucket/tfds
#
# Steps (each printed before it runs; --dry-run prints them only):
#   1. create the TPU VM if it does not exist (with --create), else reuse it;
#   2. copy this checkout (tracked and untracked, not ignored, files) to every worker, or clone
#      REPO_URL there;
#   3. on every worker: a venv with `pip install -e . "jax[tpu]"`, and the bucket mounted with
#      gcsfuse at MOUNT (default /mnt/gcs/$BUCKET);
#   4. on every worker (--worker=all): python -m dfer_clip_jax.main
#      --workdir=$MOUNT/$RUN_DIR --config.distributed.initialize=True ARGS...
#
# Why a gcsfuse mount and not --workdir=gs://...: Orbax itself writes gs:// paths, but the rest
# of the workdir (checkpoint integrity records, metrics.jsonl, TensorBoard events, reports, the
# demo tokenizer) goes through the local file system, and the trainer refuses URL workdirs. A
# mounted bucket is one folder that every host sees, as multi-host Orbax saves require (a
# per-host local folder would leave each checkpoint split over the hosts). Everything still lands
# in gs://$BUCKET/$RUN_DIR. Data paths in ARGS must also exist on every worker (e.g. on the mount).
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_pod.sh [--dry-run] [--create] [--skip-setup] [--] [ARGS for dfer_clip_jax.main...]

  --create      create the TPU VM when it does not exist (needs ACCELERATOR_TYPE, RUNTIME_VERSION)
  --skip-setup  do not copy / install / mount again (a rerun on a prepared TPU VM)
  --detach      start the run in the background on every worker (nohup; it survives a dropped
                SSH connection) and return; logs in ~/dfer_main.log on each worker
  --dry-run     print every command, run none

Required environment:
  TPU_NAME      the TPU VM (pod slice) name
  ZONE          its zone, e.g. us-central2-b (v4) or us-west4-a / us-east5-b (v5e)
  BUCKET        GCS bucket for the run (name only, no gs://)
  RUN_DIR       folder inside the bucket for this run, e.g. runs/dfew_fold1
Optional environment:
  PROJECT           gcloud project (default: the gcloud config's)
  ACCELERATOR_TYPE  with --create: v4-32, v5litepod-16, ...
  RUNTIME_VERSION   with --create: tpu-ubuntu2204-base (v4), v2-alpha-tpuv5-lite (v5e), ...
  SPOT=1            with --create: a Spot TPU VM
  MOUNT             mount point of the bucket on the workers (default /mnt/gcs/$BUCKET)
  GCSFUSE_FLAGS     gcsfuse options (default: --implicit-dirs --rename-dir-limit=200000
                    --metadata-cache-ttl-secs=0: every host sees the others' files at once and
                    Orbax can rename its temporary step folders)
  REPO_URL          clone this git URL on the workers instead of copying this checkout
  REMOTE_DIR        project folder on the workers (default: dfer_clip_jax in the home folder)
EOF
}

die() {
  echo "tpu_pod.sh: error: $*" >&2
  exit 2
}

need_var() {
  [[ -n "${!1:-}" ]] || die "environment variable $1 is not set ($2); see --help"
}

DRY_RUN=0
CREATE=0
SETUP=1
DETACH=0
while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --create) CREATE=1; shift ;;
    --skip-setup) SETUP=0; shift ;;
    --detach) DETACH=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
ARGS=("$@")

need_var TPU_NAME "the TPU VM name"
need_var ZONE "the TPU VM zone"
need_var BUCKET "the GCS bucket that holds the workdir"
need_var RUN_DIR "the run folder inside the bucket"
[[ "$BUCKET" != gs://* ]] || die "BUCKET is the bucket name without gs:// (got '$BUCKET')"
if ((CREATE)); then
  need_var ACCELERATOR_TYPE "needed by --create, e.g. v4-32 or v5litepod-16"
  need_var RUNTIME_VERSION "needed by --create, e.g. tpu-ubuntu2204-base or v2-alpha-tpuv5-lite"
fi
for arg in ${ARGS[@]+"${ARGS[@]}"}; do
  [[ "$arg" != --workdir=* ]] || die "do not pass --workdir: it is \$MOUNT/\$RUN_DIR ($arg)"
done
if ! ((DRY_RUN)); then
  command -v gcloud >/dev/null 2>&1 \
    || die "gcloud is not installed (https://cloud.google.com/sdk/docs/install)"
fi

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MOUNT="${MOUNT:-/mnt/gcs/$BUCKET}"
WORKDIR="$MOUNT/$RUN_DIR"
REMOTE_DIR="${REMOTE_DIR:-dfer_clip_jax}"
q_mount="$(printf '%q' "$MOUNT")"
q_workdir="$(printf '%q' "$WORKDIR")"
q_remote="$(printf '%q' "$REMOTE_DIR")"
GCSFUSE_FLAGS="${GCSFUSE_FLAGS:---implicit-dirs --rename-dir-limit=200000 --metadata-cache-ttl-secs=0}"
VENV="\$HOME/dfer_venv"
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE")
if [[ -n "${PROJECT:-}" ]]; then where+=(--project="$PROJECT"); fi

# A command line as copy-pasteable, readable text: plain words bare, the rest in single quotes.
show() {
  local out="" arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      out+="$arg "
    else
      out+="'${arg//\'/\'\\\'\'}' "
    fi
  done
  echo "${out% }"
}

# Prints a command, then runs it unless --dry-run.
run() {
  echo "+ $(show "$@")"
  if ! ((DRY_RUN)); then "$@"; fi
}

# Runs a shell command line on every worker of the TPU VM.
on_all_workers() {
  run "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$1"
}

echo "tpu_pod.sh: TPU VM $TPU_NAME ($ZONE), workdir gs://$BUCKET/$RUN_DIR mounted at $WORKDIR"

# 1. Create or reuse the TPU VM.
exists=1
describe=("${gcloud_tpu[@]}" describe "$TPU_NAME" "${where[@]}" --format=value\(state\))
echo "+ $(show "${describe[@]}")"
if ! ((DRY_RUN)); then
  if state="$("${describe[@]}" 2>&1)"; then
    echo "tpu_pod.sh: TPU VM $TPU_NAME exists (state: $state); reusing it"
  elif grep -qiE "not.?found" <<<"$state"; then
    exists=0
  else
    die "gcloud could not describe TPU VM $TPU_NAME: $state"
  fi
fi
if ((!exists || (DRY_RUN && CREATE))); then
  ((CREATE)) || die "TPU VM $TPU_NAME does not exist in $ZONE: pass --create (with ACCELERATOR_TYPE and RUNTIME_VERSION)"
  create=("${gcloud_tpu[@]}" create "$TPU_NAME" "${where[@]}"
          --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
  if [[ "${SPOT:-0}" == 1 ]]; then create+=(--spot); fi
  run "${create[@]}"
fi

if ((SETUP)); then
  # 2. The code on every worker.
  if [[ -n "${REPO_URL:-}" ]]; then
    on_all_workers "set -e; if [ -d $q_remote/.git ]; then git -C $q_remote pull --ff-only; else git clone --depth 1 $(printf '%q' "$REPO_URL") $q_remote; fi"
  else
    if ! ((DRY_RUN)); then
      command -v git >/dev/null 2>&1 || die "git is not installed (needed to list the files to copy)"
    fi
    archive="${TMPDIR:-/tmp}/dfer_clip_jax_$$.tgz"
    echo "+ (cd $(show "$REPO") && git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf $(show "$archive"))"
    if ! ((DRY_RUN)); then
      (cd "$REPO" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf "$archive")
      trap 'rm -f "$archive"' EXIT
    fi
    run "${gcloud_tpu[@]}" scp "$archive" "$TPU_NAME:dfer_clip_jax.tgz" "${where[@]}" --worker=all
    on_all_workers "set -e; mkdir -p $q_remote && tar -xzf dfer_clip_jax.tgz -C $q_remote && rm dfer_clip_jax.tgz"
  fi
  # 3. Python environment and the bucket mount, on every worker.
  on_all_workers "set -e; python3 -m venv $VENV && $VENV/bin/pip install -q -U pip && $VENV/bin/pip install -q -e $q_remote 'jax[tpu]>=0.10.2,<0.11'"
  on_all_workers "set -e; if ! command -v gcsfuse >/dev/null; then \
export GCSFUSE_REPO=gcsfuse-\$(lsb_release -c -s); \
curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; \
echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt \$GCSFUSE_REPO main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null; \
sudo apt-get -qq update && sudo apt-get -qq install -y gcsfuse; fi; \
sudo mkdir -p $q_mount && sudo chown \$(id -u):\$(id -g) $q_mount; \
mountpoint -q $q_mount || gcsfuse $GCSFUSE_FLAGS $(printf '%q' "$BUCKET") $q_mount"
fi

# 4. The same command on every host; process 0 prints the progress, the others only warnings.
main_cmd="$VENV/bin/python -m dfer_clip_jax.main --workdir=$q_workdir --config.distributed.initialize=True"
for arg in ${ARGS[@]+"${ARGS[@]}"}; do
  main_cmd+=" $(printf '%q' "$arg")"
done
if ((DETACH)); then
  on_all_workers "cd $q_remote && mkdir -p $q_workdir && nohup $main_cmd > \$HOME/dfer_main.log 2>&1 < /dev/null &"
  echo "tpu_pod.sh: started in the background; follow worker 0 with:"
  echo "  $(show "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=0 --command='tail -f ~/dfer_main.log')"
  exit 0
fi
on_all_workers "cd $q_remote && mkdir -p $q_workdir && $main_cmd"
echo "tpu_pod.sh: done; outputs in gs://$BUCKET/$RUN_DIR (TensorBoard: tensorboard --logdir gs://$BUCKET/$RUN_DIR/tensorboard)"
