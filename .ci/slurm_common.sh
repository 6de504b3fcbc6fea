# Sourced by .ci/slurm_up.sh and .ci/slurm_2node.sh: the slurm.conf settings both test clusters share.
slurm_common_conf() {
  cat <<'CONF'
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
ReturnToService=2
JobRequeue=1
MpiDefault=none
KillWait=30
CONF
}
