# Shared argument handling for the local launchers (sourced, not run).
# Sets PYTHON, NPROC, TARGET (a script path, or -m fgcmr.cli) and ARGS (the rest).

PYTHON=${PYTHON:-python}

gpu_count() {
    "$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0
}

free_port() {
    "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
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
}
