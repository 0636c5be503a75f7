set -euo pipefail
{{setup}}
# Relative paths in the experiment file resolve against the directory `fgcmr submit` ran in.
cd {{workdir}}
# Launcher variables inherited from the submitting shell would override Slurm's in fgcmr.distributed.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE MASTER_ADDR MASTER_PORT
{{scratch}}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
# One rank dying ends its whole step (srun --kill-on-bad-exit): the others would wait in a collective until the time limit.
export SLURM_KILL_BAD_EXIT=1
FGCMR=({{fgcmr}})
echo "fgcmr: job ${SLURM_JOB_ID} (${SLURM_JOB_NAME}) on ${SLURM_JOB_NODELIST}, start $(date -Is), restart ${SLURM_RESTART_COUNT:-0}"
