# Shared argument handling for the local launchers (sourced, not run).
# Sets PYTHON, NPROC, TARGET (a script path, or -m fgcmr.cli) and ARGS (the rest), and exports
# OMP_NUM_THREADS (the cores per rank) unless it is set: torchrun would set 1, which a rank cannot tell
# from a user's 1. Ports and the thread share come from fgcmr.launch (torch-free), as for fgcmr pipeline.

PYTHON=${PYTHON:-python}

gpu_count() {
    "$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0
}

free_port() {
    "$PYTHON" -c 'from fgcmr.launch import free_port; print(free_port())'
}

parse_args() {
    NPROC=""
    if [[ ${1:-} == -n || ${1:-} == --nproc ]]; then NPROC=$2; shift 2; fi
    if (( $# == 0 )); then
        sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' >&2
        exit 2
    fi
    if [[ -z $NPROC ]]; then
        NPROC=$(gpu_count)
        (( NPROC > 0 )) || NPROC=2
    fi
    if [[ $1 == *.py ]]; then TARGET=("$1"); shift; else TARGET=(-m fgcmr.cli); fi
    ARGS=("$@")
    local share="from fgcmr.launch import cores_per_rank; print(cores_per_rank($NPROC))"
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$("$PYTHON" -c "$share")}
}

# Run "$@" (a launcher) and exit with its code, keeping fgcmr's requeue code 75: torchrun reports a rank's
# exit 75 as 1, so the ranks also record it in $FGCMR_REQUEUE_FILE. SIGTERM and SIGUSR1 to this script
# go on to the launcher (which passes them to the ranks); Ctrl-C reaches everyone from the terminal.
run_keeping_requeue() {
    local marker child rc=0
    marker=$(mktemp -u "${TMPDIR:-/tmp}/fgcmr-requeue.XXXXXX")
    export FGCMR_REQUEUE_FILE=$marker
    "$@" &
    child=$!
    trap 'kill -TERM "$child" 2>/dev/null || true' TERM
    trap 'kill -USR1 "$child" 2>/dev/null || true' USR1
    trap ':' INT
    while kill -0 "$child" 2>/dev/null; do wait "$child" || true; done
    wait "$child" || rc=$?
    if [[ -e $marker ]]; then
        rm -f "$marker"
        (( rc == 0 )) || rc=75
    fi
    exit "$rc"
}
