#!/usr/bin/env bash
# A real single-node Slurm (Debian's slurm-wlm + munge) for tests and for trying mixlab's Slurm paths on one box.
#
#   pipelines/engines/slurm_single_node.sh up      # install if missing, write slurm.conf, start munged/slurmctld/slurmd
#   pipelines/engines/slurm_single_node.sh down    # cancel every job, stop the daemons
#   pipelines/engines/slurm_single_node.sh status  # "idle" (exit 0) when the node takes jobs
#
# Everything lives under $MIXLAB_SLURM_DIR (default /tmp/mixlab-slurm): state, spool, pid and log files. The
# config goes to /etc/slurm/slurm.conf so that sbatch/squeue find it without SLURM_CONF. Needs root (apt-get,
# daemons as root); there is no systemd, so the daemons are started directly.
set -euo pipefail

DIR="${MIXLAB_SLURM_DIR:-/tmp/mixlab-slurm}"
CONF=/etc/slurm/slurm.conf
HOST="$(hostname -s)"

log() { echo "slurm_single_node: $*" >&2; }

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
        return
    fi
    [ "$(id -u)" = 0 ] || { log "installing Slurm needs root (apt-get); run as root or install slurmctld slurmd slurm-client munge"; exit 1; }
    log "installing slurmctld slurmd slurm-client munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
}

write_conf() {
    local cpus mem
    cpus="$(nproc)"
    mem="$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.85}' /proc/meminfo)"
    mkdir -p /etc/slurm "$DIR"/{state,spool,run,log}
    cat > "$CONF" <<CONF
# written by mixlab's pipelines/engines/slurm_single_node.sh
ClusterName=mixlab
SlurmctldHost=${HOST}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool
SlurmctldPidFile=${DIR}/run/slurmctld.pid
SlurmdPidFile=${DIR}/run/slurmd.pid
SlurmctldLogFile=${DIR}/log/slurmctld.log
SlurmdLogFile=${DIR}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
# a job array whose afterok dependency is met starts within a second, not on the 3 s batch_sched_delay tick
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
DependencyParameters=kill_invalid_depend
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MaxArraySize=10001
MinJobAge=300
KillWait=5
NodeName=${HOST} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=${HOST} Default=YES MaxTime=INFINITE State=UP
CONF
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
    [ -s /etc/munge/munge.key ] || { mungekey --create >/dev/null 2>&1 || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null; }
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    runuser -u munge -- munged --force
    for _ in $(seq 50); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return
        sleep 0.1
    done
    log "munged did not start (see /var/log/munge/munged.log)"
    exit 1
}

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

node_state() { sinfo -h -o %T 2>/dev/null | head -1; }

up() {
    install_packages
    start_munge
    if alive "$DIR/run/slurmctld.pid" && alive "$DIR/run/slurmd.pid" && [ "$(node_state)" = idle ]; then
        log "already up (node ${HOST} idle)"
        return
    fi
    write_conf
    alive "$DIR/run/slurmctld.pid" || slurmctld -c -i
    alive "$DIR/run/slurmd.pid" || slurmd
    for _ in $(seq 100); do
        case "$(node_state)" in
            idle|mixed|allocated) log "up: node ${HOST}, $(nproc) CPUs, partition debug"; return ;;
        esac
        sleep 0.2
    done
    log "the node did not become idle; logs: $DIR/log/slurmctld.log $DIR/log/slurmd.log"
    exit 1
}

down() {
    if command -v scancel >/dev/null && alive "$DIR/run/slurmctld.pid"; then
        scancel --full --quiet -u "$(id -un)" 2>/dev/null || true
    fi
    for daemon in slurmd slurmctld; do
        if alive "$DIR/run/$daemon.pid"; then
            kill -TERM "$(cat "$DIR/run/$daemon.pid")" 2>/dev/null || true
        fi
    done
    for _ in $(seq 50); do
        alive "$DIR/run/slurmd.pid" || alive "$DIR/run/slurmctld.pid" || break
        sleep 0.1
    done
    if [ -s /run/munge/munged.pid ]; then
        kill -TERM "$(cat /run/munge/munged.pid)" 2>/dev/null || true
    fi
    log "down"
}

status() {
    local state
    state="$(node_state || true)"
    echo "${state:-down}"
    [ "$state" = idle ] || [ "$state" = mixed ] || [ "$state" = allocated ]
}

case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
