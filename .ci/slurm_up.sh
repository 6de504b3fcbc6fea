#!/usr/bin/env bash
# A one-node Slurm cluster on localhost for the tests (root; Debian's packages), then the two-node one of
# .ci/slurm_2node.sh beside it. Idempotent.
set -euo pipefail
# shellcheck source=slurm_common.sh
source "$(dirname "$0")/slurm_common.sh"
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null
fi
HOST=$(hostname -s)
mkdir -p /etc/munge /var/log/munge /run/munge /var/lib/munge /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
chown -R munge:munge /etc/munge /var/log/munge /run/munge /var/lib/munge 2>/dev/null || true
chmod 400 /etc/munge/munge.key
pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged 2>/dev/null || /usr/sbin/munged --force
cat > /etc/slurm/slurm.conf <<CONF
ClusterName=local
SlurmctldHost=$HOST
$(slurm_common_conf)
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$HOST CPUs=$(nproc) RealMemory=$(( $(free -m | awk '/Mem:/{print $2}') * 8 / 10 )) State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 1 60); do
  state=$(sinfo -h -o %t 2>/dev/null | head -1 || true)
  case "$state" in idle|mix|alloc)
    echo "slurm up: $HOST $state"
    # The two-node cluster (two network namespaces) beside it, for tests/test_slurm.py's multi-node jobs.
    exec bash "$(dirname "$0")/slurm_2node.sh" up ;;
  esac
  [ "$state" = "down" ] || [ "$state" = "drain" ] && scontrol update nodename="$HOST" state=resume 2>/dev/null || true
  sleep 1
done
echo "slurm did not come up; see /var/log/slurm/*.log" >&2
exit 1
