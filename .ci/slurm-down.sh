#!/usr/bin/env bash
# Stop the Slurm daemons started by .ci/slurm-up.sh, by the PIDs it recorded (never by name).
set -uo pipefail
STATE=${FGCMR_SLURM_STATE:-/run/fgcmr-slurm}
for name in slurmd slurmctld munged; do
    pidfile=$STATE/$name.pid
    [[ -s $pidfile ]] || continue
    pid=$(<"$pidfile")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
        echo "slurm-down: stopped $name (pid $pid)" >&2
    fi
    rm -f "$pidfile"
done
