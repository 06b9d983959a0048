#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests/test_slurm.py: Debian's slurm-wlm and
# munge, slurmctld and slurmd on localhost, a `cpu` and a `gpu` partition over the one node,
# and GPUs declared by count (gres.conf, on placeholder files), so a job asking for GPUs is
# scheduled on a CPU-only machine. Accounting without slurmdbd: slurmctld writes one line
# per finished job to the job-completion log (JobCompLoc below), which the test counts, and
# MinJobAge keeps finished jobs in `squeue` for the executor plugin's status queries.
#
# Run as root (CI and the dev machine are). Idempotent: with the cluster up on this script's
# config it only checks that the node answers; on another config it restarts slurmctld and
# slurmd. Measured on 2 cores: about 20 s with the packages to install, 3 s
# with them installed, under 1 s when the cluster is already up.
#
#   .ci/slurm-cluster.sh          start (or check) the cluster
#   .ci/slurm-cluster.sh stop     stop the daemons (the config and packages stay)
set -euo pipefail

CONF=/etc/slurm/slurm.conf
JOBCOMP=/var/log/slurm/jobcomp.log
NODE=$(hostname -s)
GPUS=2

die() { echo "slurm-cluster: $*" >&2; exit 1; }

node_state() { sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n1; }

up() {  # slurmctld answers and the node takes jobs
    case "$(node_state)" in idle|mix|alloc) return 0 ;; *) return 1 ;; esac
}

install_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v munged >/dev/null && return
    [ "$(id -u)" = 0 ] || die "installing slurm-wlm and munge needs root (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null 2>&1 \
        || { apt-get update -q >/dev/null && \
             apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null; } \
        || die "apt-get could not install slurm-wlm and munge"
}

write_config() {  # to $1
    local cpus mem
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) * 9 / 10 ))
    mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
    cat >"$1" <<EOF
# written by .ci/slurm-cluster.sh: one node on localhost, for the tests
ClusterName=longctx-ci
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$JOBCOMP
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
KillWait=30
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem Gres=gpu:$GPUS State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE MaxTime=INFINITE State=UP
EOF
    # GPUs by count on placeholder files (slurmd drops a GPU without a File, and binds no
    # device with task/none), so GPU jobs schedule on a CPU-only machine
    local i
    for i in $(seq 0 $((GPUS - 1))); do : >"/var/spool/slurmd/gpu$i"; done
    printf 'AutoDetect=off\nNodeName=%s Name=gpu Count=%s File=/var/spool/slurmd/gpu[0-%s]\n' \
        "$NODE" "$GPUS" "$((GPUS - 1))" >/etc/slurm/gres.conf
}

running() { pgrep -x -r R,S,D "$1" >/dev/null; }  # a zombie (a dead daemon) does not count

start_daemons() {
    if ! running munged; then
        install -d -o munge -g munge -m 0755 /run/munge
        [ -s /etc/munge/munge.key ] || runuser -u munge -- mungekey --create >/dev/null
        runuser -u munge -- /usr/sbin/munged
    fi
    running slurmctld || slurmctld
    running slurmd || slurmd
}

wait_idle() {  # slurmctld needs a moment before it answers; the node then registers
    local i
    for i in $(seq 1 60); do
        up && return 0
        case "$(node_state)" in down*|drain*) scontrol update nodename="$NODE" state=resume \
            >/dev/null 2>&1 || true ;; esac
        sleep 0.5
    done
    die "node $NODE not idle after 30 s: $(sinfo -h -N 2>&1 | head -n1); see /var/log/slurm/"
}

stop_slurm() {  # slurmd and slurmctld, waiting until they are gone (a restart follows)
    local daemon i
    for daemon in slurmd slurmctld; do pkill -x "$daemon" 2>/dev/null || true; done
    for i in $(seq 1 40); do
        running slurmd || running slurmctld || return 0
        sleep 0.25
    done
    die "slurmd or slurmctld still running 10 s after SIGTERM"
}

stop() {
    stop_slurm
    [ -f /run/munge/munged.pid ] && kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
}

configure() {  # this script's slurm.conf; a running cluster with another one is restarted
    local next=$CONF.next
    write_config "$next"
    if cmp -s "$next" "$CONF"; then rm -f "$next"; return; fi
    mv "$next" "$CONF"
    stop_slurm
}

case "${1:-start}" in
    start)
        install_packages
        configure
        if up; then exit 0; fi
        start_daemons
        wait_idle
        echo "slurm-cluster: node $NODE idle (partitions cpu, gpu; job log $JOBCOMP)"
        ;;
    stop) stop ;;
    *) die "usage: $0 [start|stop]" ;;
esac
