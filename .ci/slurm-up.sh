#!/usr/bin/env bash
# Start a real single-node Slurm cluster on this machine (root, no systemd), for the Slurm tests.
#
#   bash .ci/slurm-up.sh      # idempotent: does nothing if `sinfo` already answers
#   bash .ci/slurm-down.sh    # stops the daemons this script started, by PID
#
# Installs Debian's slurm-wlm (Slurm + munge) if missing, writes /etc/slurm/slurm.conf (unless a
# config not written by this script is already there), starts munged, slurmctld and slurmd, and
# waits until the node is idle. Exit 0: cluster up. Exit 3: slurm-wlm could not be installed.
set -euo pipefail

STATE=${FGCMR_SLURM_STATE:-/run/fgcmr-slurm}   # pid files of the daemons we started
CONF=/etc/slurm/slurm.conf
MARK="# written by fgcmr .ci/slurm-up.sh"

log() { echo "slurm-up: $*" >&2; }

if command -v sinfo >/dev/null && timeout 5 sinfo -h >/dev/null 2>&1; then
    log "a Slurm cluster already answers; nothing to do"
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

cpus=$(OMP_NUM_THREADS= OMP_THREAD_LIMIT= nproc)   # nproc obeys OMP_NUM_THREADS, which a calling test process may have set
mem_mb=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 3 / 4 ))
mkdir -p /etc/slurm "$STATE" /var/spool/slurmd /var/spool/slurmctld /var/log/slurm /run/munge
chown munge:munge /run/munge
cat >"$CONF" <<CONF
$MARK
ClusterName=fgcmr
SlurmctldHost=localhost
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
SlurmdPidFile=$STATE/slurmd.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF

if ! pgrep -x munged >/dev/null; then
    rm -f /run/munge/munged.pid
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do [[ -s /run/munge/munged.pid ]] && break; sleep 0.1; done
    cp /run/munge/munged.pid "$STATE/munged.pid"  # the daemon's own pid file (it forks)
fi
slurmctld -c  # a clean controller state: no jobs left over from an earlier session
slurmd -N localhost

for _ in $(seq 60); do
    state=$(sinfo -h -n localhost -o %t 2>/dev/null || true)
    if [[ $state == idle* || $state == mix* || $state == alloc* ]]; then
        log "node localhost is $state ($cpus CPUs); pids in $STATE"
        exit 0
    fi
    sleep 1
done
log "node did not become idle in 60 s (state: ${state:-none}); see /var/log/slurm/"
exit 1
