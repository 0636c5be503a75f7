#!/usr/bin/env bash
# Stop the Slurm daemons started by .ci/slurm-up.sh, by the PIDs it recorded (never by name).
# FGCMR_SLURM_STATE selects the cluster (default /run/fgcmr-slurm), as for slurm-up.sh.
set -uo pipefail
STATE=${FGCMR_SLURM_STATE:-/run/fgcmr-slurm}
shopt -s nullglob
for pidfile in "$STATE"/slurmd*.pid "$STATE/slurmctld.pid" "$STATE/munged.pid"; do
    [[ -s $pidfile ]] || continue
    pid=$(<"$pidfile")
    name=$(basename "$pidfile" .pid)
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
        echo "slurm-down: stopped $name (pid $pid)" >&2
    fi
    rm -f "$pidfile"
done
