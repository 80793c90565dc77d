#!/usr/bin/env bash
# A real SLURM on this one host, for tests/test_slurm.py (and for trying launch/slurm.sbatch):
# installs Debian's slurm-wlm and munge (apt-get, as root), writes /etc/slurm/slurm.conf for two
# nodes, n1 and n2, both on 127.0.0.1 (two slurmd, one port each: Debian's slurmd takes -N NODE),
# and starts munged, slurmctld and the two slurmd. No cgroups (proctrack/linuxproc, task/none),
# so it runs in containers too. Idempotent: a second call with everything up returns in a second.
#
#   sudo scripts/local_slurm.sh          # then: STAGE=sft sbatch launch/slurm.sbatch run_dir=...
#   sudo scripts/local_slurm.sh stop     # stop the daemons (the config and packages stay)
set -euo pipefail

CONF=/etc/slurm/slurm.conf
NODES=(n1 n2)
CPUS=$(nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 / 2 ))

stop_daemons() {  # and wait until they are gone: a slurmd still shutting down would hold its port
  pkill -x slurmd || true
  pkill -x slurmctld || true
  for _ in $(seq 20); do { pgrep -x slurmd || pgrep -x slurmctld; } >/dev/null || return 0; sleep 0.5; done
  pkill -9 -x slurmd || true
  pkill -9 -x slurmctld || true
  sleep 0.5
}
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
nodes_up() { [[ $(sinfo -h -N -o '%N %t' 2>/dev/null | grep -cE ' (idle|mix|alloc)$') == "${#NODES[@]}" ]]; }

if [[ ${1:-} == stop ]]; then
  stop_daemons
  exit 0
fi

if [[ $(id -u) != 0 ]]; then
  echo "local_slurm.sh: run as root (it installs packages and starts system daemons)" >&2
  exit 2
fi

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  apt-get install -y -q --no-install-recommends slurm-wlm munge
fi

mkdir -p /etc/slurm /var/spool/slurmctld /var/log/slurm /run/munge
want=$(cat <<EOF
# Written by mistral_tune's scripts/local_slurm.sh: a test cluster of ${#NODES[@]} nodes on this host.
ClusterName=local
SlurmctldHost=localhost
SlurmctldPort=6817
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd-%n.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
# No cgroups: processes are tracked by parent pid, tasks are not bound.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Both nodes share this host's cores: trust the config, not the hardware count.
SlurmdParameters=config_overrides
KillWait=5
InactiveLimit=0
MinJobAge=300
NodeName=n1 NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=17001 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
NodeName=n2 NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=17002 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=local Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
)
changed=0
if [[ ! -f $CONF ]] || [[ "$(cat $CONF)" != "$want" ]]; then
  echo "$want" > "$CONF"
  changed=1
fi

# munged answers (a credential round trip), not merely a process of that name (a dying or zombie one)
if ! munge_ok; then
  chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
  [[ -f /etc/munge/munge.key ]] || { mungekey --create 2>/dev/null || create-munge-key -f; chown munge:munge /etc/munge/munge.key; }
  runuser -u munge -- /usr/sbin/munged
  for _ in $(seq 20); do munge_ok && break; sleep 0.5; done
fi
if [[ $changed == 0 ]] && nodes_up; then  # already running with this config
  sinfo -N
  exit 0
fi
stop_daemons  # a new config, or daemons that are not all up: start them afresh
slurmctld
for n in "${NODES[@]}"; do
  mkdir -p "/var/spool/slurmd/$n"
  slurmd -N "$n"
done

for _ in $(seq 60); do  # both nodes registered and idle
  if nodes_up; then
    sinfo -N
    exit 0
  fi
  sleep 1
done
echo "local_slurm.sh: the nodes did not come up; sinfo says:" >&2
sinfo -N >&2 || true
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd-n1.log >&2 || true
exit 1
