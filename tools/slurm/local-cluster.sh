#!/usr/bin/env bash
# A real single-node Slurm on this machine (Debian's slurm-wlm and munge: slurmctld and slurmd
# on localhost), for tests/cluster.rs and for trying `onestep submit --slurm` without a cluster.
#
#   tools/slurm/local-cluster.sh install   # apt-get install slurm-wlm munge (root or sudo)
#   tools/slurm/local-cluster.sh start     # configure and start munged, slurmctld, slurmd
#   tools/slurm/local-cluster.sh status    # sinfo
#   tools/slurm/local-cluster.sh stop
#
# `start` is idempotent: with a controller already answering it only waits for the node. It
# writes /etc/slurm/slurm.conf only when none exists or when it wrote the one there, so it
# leaves a real cluster's configuration alone. Needs root (the daemons run as root here).
# Exits 3 with the reason on stderr when Slurm cannot be brought up on this machine.
set -euo pipefail

MARK="# written by onestep tools/slurm/local-cluster.sh"
CONF=/etc/slurm/slurm.conf

die() { echo "local-cluster: $*" >&2; exit 3; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then sudo "$@"; else
    die "needs root (or passwordless sudo) to $*"; fi
}

answering() { timeout 10 sinfo -h >/dev/null 2>&1; }

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    return 0
  fi
  command -v apt-get >/dev/null || die "no apt-get: install Slurm (slurmctld, slurmd, munge) another way"
  as_root apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 ||
    { as_root apt-get update -qq >/dev/null 2>&1 && as_root apt-get install -y -q slurm-wlm munge >/dev/null; } ||
    die "apt-get install slurm-wlm munge failed"
}

start() {
  command -v slurmctld >/dev/null || die "slurmctld not installed (run: $0 install)"
  if answering && sinfo -h -o %T | grep -qE '^(idle|mixed|allocated)'; then
    return 0
  fi
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  as_root mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /run/munge /var/log/munge /var/lib/munge /var/log/slurm
  if [ ! -f "$CONF" ] || grep -qF "$MARK" "$CONF"; then
    as_root tee "$CONF" >/dev/null <<EOF
$MARK
ClusterName=onestep
SlurmctldHost=$host(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmUser=root
SlurmdUser=root
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
MinJobAge=3600
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  fi
  if [ ! -s /etc/munge/munge.key ]; then
    as_root sh -c 'dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null && chmod 400 /etc/munge/munge.key'
  fi
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    as_root munged --force >/dev/null 2>&1 || die "munged did not start"
    sleep 1
    munge -n | unmunge >/dev/null 2>&1 || die "munge credentials do not round-trip"
  fi
  pgrep -x slurmctld >/dev/null || as_root slurmctld || die "slurmctld did not start (see /var/log/slurm/slurmctld.log)"
  pgrep -x slurmd >/dev/null || as_root slurmd || die "slurmd did not start (see /var/log/slurm/slurmd.log)"
  for _ in $(seq 1 60); do
    if answering && sinfo -h -o %T | grep -qE '^(idle|mixed|allocated)'; then
      return 0
    fi
    sleep 1
  done
  # A node left DOWN by an earlier controller: bring it back once.
  as_root scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true
  sleep 2
  answering && sinfo -h -o %T | grep -qE '^(idle|mixed|allocated)' && return 0
  die "Slurm started but the node is not idle: $(sinfo -h -o '%T %E' 2>&1 | head -1)"
}

stop() {
  as_root pkill -x slurmd || true
  as_root pkill -x slurmctld || true
}

case "${1:-start}" in
  install) install ;;
  start) start ;;
  status) sinfo ;;
  stop) stop ;;
  *) echo "usage: $0 install|start|status|stop" >&2; exit 2 ;;
esac
