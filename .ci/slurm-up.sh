#!/usr/bin/env bash
# Start a real multi-node Slurm cluster on this machine (root, no systemd), for the Slurm tests.
#
#   bash .ci/slurm-up.sh      # idempotent: does nothing if `sinfo` already answers
#   bash .ci/slurm-down.sh    # stops the daemons this script started, by PID
#
# Two nodes, n1 and n2, both served by this machine: Slurm's "multiple slurmd" mode (one slurmd per
# node name, each on its own port, NodeHostname=localhost, NodeAddr=127.0.0.1), so `srun -N2` runs
# tasks on two Slurm nodes that must find each other over TCP like real ones. Each node offers all
# of the machine's cores (the nodes share them; single-node jobs keep their full size). The node
# names are added to /etc/hosts (127.0.0.1) when they do not resolve, as a cluster's DNS would.
#
# Installs Debian's slurm-wlm (Slurm + munge) if missing, writes $SLURM_CONF (default
# /etc/slurm/slurm.conf; unless a config not written by this script is already there), starts
# munged, slurmctld and one slurmd per node, and waits until every node is idle.
# Exit 0: cluster up. Exit 3: slurm-wlm could not be installed.
#
# A second, separate cluster beside a running one (its own config, state, ports and name):
#   export SLURM_CONF=/run/my-slurm/slurm.conf   # every Slurm command then talks to it
#   FGCMR_SLURM_STATE=/run/my-slurm FGCMR_SLURM_PORT=17817 FGCMR_SLURM_CLUSTER=mine \
#   FGCMR_SLURM_NODE_PREFIX=my bash .ci/slurm-up.sh
set -euo pipefail

STATE=${FGCMR_SLURM_STATE:-/run/fgcmr-slurm}   # pid files, spool, state and logs of the daemons we start
CONF=${SLURM_CONF:-/etc/slurm/slurm.conf}
NODES=${FGCMR_SLURM_NODES:-2}
PREFIX=${FGCMR_SLURM_NODE_PREFIX:-n}
PORT=${FGCMR_SLURM_PORT:-6817}                 # slurmctld; node i's slurmd listens on PORT + i
CLUSTER=${FGCMR_SLURM_CLUSTER:-fgcmr}
MARK="# written by fgcmr .ci/slurm-up.sh"
export SLURM_CONF=$CONF

log() { echo "slurm-up: $*" >&2; }

if command -v sinfo >/dev/null && timeout 5 sinfo -h >/dev/null 2>&1; then
    log "a Slurm cluster already answers ($CONF); nothing to do"
    exit 0
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    log "installing slurm-wlm"
    if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm; } >/tmp/fgcmr-slurm-apt.log 2>&1; then
        log "could not install slurm-wlm (see /tmp/fgcmr-slurm-apt.log)"
        exit 3
    fi
fi

if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
    log "$CONF exists and was not written by this script; refusing to overwrite it"
    exit 4
fi

names=$(seq -f "$PREFIX%g" -s , 1 "$NODES")
for name in ${names//,/ }; do
    if ! getent hosts "$name" >/dev/null; then
        echo "127.0.0.1 $name  $MARK" >>/etc/hosts
    fi
done

cpus=$(OMP_NUM_THREADS= OMP_THREAD_LIMIT= nproc)   # nproc obeys OMP_NUM_THREADS, which a calling test process may have set
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 3 / 4 / NODES ))
mkdir -p "$(dirname "$CONF")" "$STATE/ctld" "$STATE/log" /run/munge
chown munge:munge /run/munge
{
    cat <<CONF
$MARK
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmctldPort=$PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
MailProg=/bin/true
# Keep finished jobs visible to scontrol for an hour (no accounting database here).
MinJobAge=3600
KillWait=10
SlurmctldPidFile=$STATE/slurmctld.pid
StateSaveLocation=$STATE/ctld
SlurmctldLogFile=$STATE/log/slurmctld.log
# Several slurmd on one host: %n (the node name) keeps their files apart.
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmdSpoolDir=$STATE/spool-%n
SlurmdLogFile=$STATE/log/slurmd-%n.log
CONF
    i=0
    for name in ${names//,/ }; do
        i=$((i + 1))
        echo "NodeName=$name NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((PORT + i)) CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$names Default=YES MaxTime=INFINITE State=UP"
} >"$CONF"

if ! pgrep -x munged >/dev/null; then
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do [[ -s /run/munge/munged.pid ]] && break; sleep 0.1; done
    cp /run/munge/munged.pid "$STATE/munged.pid"  # the daemon's own pid file (it forks)
fi
slurmctld -c -f "$CONF"  # a clean controller state: no jobs left over from an earlier session
for name in ${names//,/ }; do
    slurmd -f "$CONF" -N "$name"
done

for _ in $(seq 60); do
    states=$(sinfo -h -N -o %t 2>/dev/null | sort -u | tr '\n' ' ' || true)
    ready=$(sinfo -h -N -t idle,mix,alloc -o %N 2>/dev/null | sort -u | wc -l || true)
    if (( ready == NODES )); then
        log "cluster $CLUSTER up: nodes $names idle ($cpus CPUs each); config $CONF, state in $STATE"
        exit 0
    fi
    sleep 1
done
log "nodes did not become idle in 60 s (states: ${states:-none}); see $STATE/log/"
exit 1
