#!/usr/bin/env bash
# Runs one command on every worker of a Cloud TPU VM slice, creating the VM if needed.
#
#   launch/tpu_vm.sh --name=NAME --zone=ZONE [FLAGS] -- COMMAND [ARGS...]
#   launch/tpu_vm.sh --name=dpo --zone=us-east5-a --accelerator=v5p-64 -- \
#       python -m jalign.train --config=configs/dpo_8b.py --workdir=/mnt/shared/dpo_8b
#   launch/tpu_vm.sh --name=dpo --zone=us-east5-a --delete          # tear it down
#
# Flags:
#   --name=NAME          TPU VM name (default $TPU_NAME); required
#   --zone=ZONE          zone (default $TPU_ZONE); required
#   --project=PROJECT    Google Cloud project (default: gcloud's configured one)
#   --accelerator=TYPE   e.g. v5litepod-16, v5p-64, v6e-16, v4-32; needed to create
#   --version=RUNTIME    TPU software version for a new VM (default from the
#                        accelerator: v5litepod v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5,
#                        v6e v2-alpha-tpuv6e, v4 tpu-ubuntu2204-base)
#   --spot               create a Spot VM
#   --source=DIR         the jalign checkout copied to every worker (default: this repo)
#   --remote_dir=DIR     where it goes on each worker, relative to home (default: jalign)
#   --install=CMD        run in remote_dir on every worker after the copy
#                        (default: pip install -e '.[tpu]')
#   --skip_install       neither copy nor install: reuse what the workers have
#   --log=FILE           also append the streamed output to FILE
#   --delete_after       delete the VM when the command ends, whatever its status
#   --delete             only delete the VM, then exit
#   --dry-run            print the commands instead of running them
#   -h, --help           this text
#
# The command runs on all workers at once (gcloud ... ssh --worker=all) with
# JALIGN_DISTRIBUTED=cluster, so jalign.distributed.initialize joins the slice's
# processes; every worker's output streams here and the exit status is the command's.
# The --workdir must be the same storage on every worker (a gcsfuse-mounted bucket,
# Filestore/NFS): each process writes its own checkpoint shards there.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "tpu_vm.sh: $*" >&2; exit 2; }

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
name="${TPU_NAME:-}"
zone="${TPU_ZONE:-}"
project=""
accelerator=""
version=""
spot=0
source_dir="$(dirname "$here")"
remote_dir="jalign"
install="pip install -e '.[tpu]'"
skip_install=0
log=""
delete_after=0
delete_only=0
dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) name="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --accelerator=*) accelerator="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --spot) spot=1 ;;
    --source=*) source_dir="${1#*=}" ;;
    --remote_dir=*) remote_dir="${1#*=}" ;;
    --install=*) install="${1#*=}" ;;
    --skip_install) skip_install=1 ;;
    --log=*) log="${1#*=}" ;;
    --delete_after) delete_after=1 ;;
    --delete) delete_only=1 ;;
    --dry-run|--dry_run) dry_run=1 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown flag '$1' (the command goes after --; see --help)" ;;
  esac
  shift
done

[[ -n "$name" ]] || die "--name (or \$TPU_NAME) is required"
[[ -n "$zone" ]] || die "--zone (or \$TPU_ZONE) is required"
[[ "$delete_only" == 1 || $# -gt 0 ]] || die "no command given: tpu_vm.sh [FLAGS] -- COMMAND"
if [[ "$dry_run" == 0 ]]; then
  command -v gcloud >/dev/null 2>&1 || die "gcloud is required: https://cloud.google.com/sdk/docs/install"
  command -v tar >/dev/null 2>&1 || die "tar is required"
fi

where=(--zone="$zone")
[[ -z "$project" ]] || where+=(--project="$project")

run() {  # prints the command under --dry-run, runs it otherwise
  if [[ "$dry_run" == 1 ]]; then printf '%q ' "$@"; printf '\n'; else "$@"; fi
}

delete_vm() { run gcloud compute tpus tpu-vm delete "$name" "${where[@]}" --quiet; }

if [[ "$delete_only" == 1 ]]; then
  delete_vm
  exit 0
fi

exists=0
if [[ "$dry_run" == 1 ]]; then
  echo "# create the VM unless 'gcloud compute tpus tpu-vm describe $name' finds it:"
elif gcloud compute tpus tpu-vm describe "$name" "${where[@]}" --format='value(state)' >/dev/null 2>&1; then
  exists=1
  echo "tpu_vm.sh: reusing TPU VM $name in $zone" >&2
fi
if [[ "$exists" == 0 ]]; then
  [[ -n "$accelerator" ]] || die "TPU VM $name does not exist; pass --accelerator=TYPE to create it"
  if [[ -z "$version" ]]; then
    case "$accelerator" in
      v5litepod-*|v5e-*) version="v2-alpha-tpuv5-lite" ;;
      v5p-*) version="v2-alpha-tpuv5" ;;
      v6e-*) version="v2-alpha-tpuv6e" ;;
      v4-*) version="tpu-ubuntu2204-base" ;;
      *) die "no default --version for accelerator '$accelerator'; pass --version=RUNTIME" ;;
    esac
  fi
  create=(gcloud compute tpus tpu-vm create "$name" "${where[@]}"
          --accelerator-type="$accelerator" --version="$version")
  [[ "$spot" == 0 ]] || create+=(--spot)
  run "${create[@]}"
fi

if [[ "$skip_install" == 0 ]]; then
  [[ -d "$source_dir" ]] || die "--source=$source_dir is not a directory"
  archive="${TMPDIR:-/tmp}/jalign-$name.tgz"
  run tar -C "$source_dir" --exclude=.git --exclude=__pycache__ --exclude='*.egg-info' \
    -czf "$archive" .
  run gcloud compute tpus tpu-vm scp "$archive" "$name:jalign-src.tgz" "${where[@]}" --worker=all
  setup="mkdir -p $(printf '%q' "$remote_dir") && tar -xzf jalign-src.tgz -C $(printf '%q' "$remote_dir") && cd $(printf '%q' "$remote_dir") && $install"
  run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command="$setup"
fi

remote="cd $(printf '%q' "$remote_dir") && JALIGN_DISTRIBUTED=cluster$(printf ' %q' "$@")"
status=0
if [[ "$dry_run" == 1 || -z "$log" ]]; then
  run gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command="$remote" \
    || status=$?
else
  gcloud compute tpus tpu-vm ssh "$name" "${where[@]}" --worker=all --command="$remote" 2>&1 \
    | tee -a "$log" || status=$?
fi
if [[ "$delete_after" == 1 ]]; then
  delete_vm
fi
exit "$status"
