#!/usr/bin/env bash
# A two-node Slurm cluster on one machine (root; Debian's packages): two Linux network namespaces ns1/ns2
# ("hosts" n1/n2, 10.77.0.11/.12) joined by a bridge in the root namespace (10.77.0.1, where slurmctld
# listens), a slurmd in each namespace. Munge and the Slurm config are shared through the filesystem (the
# namespaces share it: only the network is separate). Its own config and ports, so it runs beside the
# one-node cluster of .ci/slurm_up.sh.
#
#   bash .ci/slurm_2node.sh up      # idempotent; prints the SLURM_CONF to use
#   SLURM_CONF=/etc/slurm-2n/slurm.conf sbatch --nodes=2 ...
#   bash .ci/slurm_2node.sh down    # stops both slurmd and the controller, removes namespaces and bridge
set -euo pipefail
# shellcheck source=slurm_common.sh
source "$(dirname "$0")/slurm_common.sh"
CONF_DIR=/etc/slurm-2n
CONF=$CONF_DIR/slurm.conf
STATE=/var/spool/slurm-2n
BR=br-slurm2n
NET=10.77.0
NODES=(n1 n2)

down() {
  for n in "${NODES[@]}"; do
    [ -f "$STATE/slurmd-$n.pid" ] && kill "$(cat "$STATE/slurmd-$n.pid")" 2>/dev/null || true
  done
  [ -f "$STATE/slurmctld.pid" ] && kill "$(cat "$STATE/slurmctld.pid")" 2>/dev/null || true
  sleep 1
  for i in 1 2; do ip netns del "ns$i" 2>/dev/null || true; done
  ip link del "$BR" 2>/dev/null || true
  sed -i '/# slurm-2n$/d' /etc/hosts
  rm -f "$STATE"/*.pid
  echo "slurm 2-node down"
}

netns_up() {
  ip link show "$BR" >/dev/null 2>&1 || {
    ip link add "$BR" type bridge
    ip addr add "$NET.1/24" dev "$BR"
  }
  ip link set "$BR" up
  for i in 1 2; do
    if ! ip netns list | grep -qw "ns$i"; then
      ip netns add "ns$i"
      ip link add "veth$i" type veth peer name eth0 netns "ns$i"
      ip link set "veth$i" master "$BR" up
      ip -n "ns$i" addr add "$NET.1$i/24" dev eth0
      ip -n "ns$i" link set eth0 up
      ip -n "ns$i" link set lo up
      ip -n "ns$i" route add default via "$NET.1"
    fi
  done
  # Names resolve the same in every namespace (one /etc/hosts): the trainer's MASTER_ADDR is "n1".
  sed -i '/# slurm-2n$/d' /etc/hosts
  printf '%s %s # slurm-2n\n' "$NET.11" n1 "$NET.12" n2 "$NET.1" slurm2n-ctl >> /etc/hosts
}

write_conf() {
  local cpus mem
  cpus=$(nproc)
  mem=$(( $(free -m | awk '/Mem:/{print $2}') * 4 / 10 ))
  mkdir -p "$CONF_DIR" "$STATE"/ctld /var/log/slurm
  cat > "$CONF" <<CONF
ClusterName=twonode
SlurmctldHost=$(hostname -s)($NET.1)
SlurmctldPort=6917
SlurmdPort=6918
$(slurm_common_conf)
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool-%n
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld-2n.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
NodeName=n1 NodeAddr=$NET.11 CPUs=$cpus RealMemory=$mem State=UNKNOWN
NodeName=n2 NodeAddr=$NET.12 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=two Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

up() {
  # Munge (and the packages) come from the one-node script's install steps.
  command -v slurmctld >/dev/null && pgrep -x munged >/dev/null || {
    echo "munge/slurm missing: run .ci/slurm_up.sh first (it installs both and starts munged)" >&2; exit 1; }
  command -v ip >/dev/null && command -v nsenter >/dev/null || {
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2 util-linux >/dev/null; }
  netns_up
  write_conf
  alive "$STATE/slurmctld.pid" || slurmctld -f "$CONF"
  for i in 1 2; do
    mkdir -p "$STATE/spool-n$i"
    # nsenter --net, not `ip netns exec`: the latter remounts /sys, and slurmd then finds no cgroup fs.
    alive "$STATE/slurmd-n$i.pid" || nsenter --net=/var/run/netns/ns$i slurmd -f "$CONF" -N "n$i"
  done
  for _ in $(seq 1 60); do
    states=$(SLURM_CONF=$CONF sinfo -h -N -o '%N=%t' 2>/dev/null | sort -u | tr '\n' ' ' || true)
    if [ "$(grep -oE 'n[12]=(idle|mix|alloc)' <<<"$states" | sort -u | wc -l)" = 2 ]; then
      echo "slurm 2-node up: $states(SLURM_CONF=$CONF)"; exit 0
    fi
    for n in "${NODES[@]}"; do
      grep -qE "$n=(down|drain)" <<<"$states" && SLURM_CONF=$CONF scontrol update nodename=$n state=resume 2>/dev/null || true
    done
    sleep 1
  done
  echo "2-node slurm did not come up ($states); see /var/log/slurm/*-2n.log, slurmd-n1.log, slurmd-n2.log" >&2
  exit 1
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
