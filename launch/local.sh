#!/bin/bash
# Rehearse a pod run on this machine: N processes x M fake CPU devices (see launch/local.py for the details).
#
#   launch/local.sh 2 4 analogjax distill --config configs/pod_rehearsal_cpu.yaml --workdir runs/rehearsal
set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: launch/local.sh PROCESSES DEVICES_PER_PROCESS COMMAND [ARGS...]" >&2
  exit 2
fi
processes=$1
devices=$2
shift 2
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
exec "${PYTHON:-python3}" "$here/local.py" --processes "$processes" --devices "$devices" -- "$@"
