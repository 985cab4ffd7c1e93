#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests and for trying the cluster path by hand.
#
#   scripts/slurm_cluster.sh up       install slurmctld/slurmd/munge if missing (apt-get, root), write a munge
#                                      key and a slurm.conf for this host, start munged, slurmctld and slurmd
#   scripts/slurm_cluster.sh status   does the controller answer, and in what state is the node
#   scripts/slurm_cluster.sh down     stop the three daemons this script started
#   scripts/slurm_cluster.sh env      the lines to eval so that sbatch/sinfo/submitit find this cluster
#
# Everything (key, config, state, logs, pid files) lives in POTION_SLURM_DIR (default /tmp/potion-slurm); the
# system's own munge and slurm set-up is not touched. Clients find the cluster through SLURM_CONF, and its
# sacct (bin/sacct: see write_sacct) through PATH:
#   eval "$(scripts/slurm_cluster.sh env)"   # export SLURM_CONF=/tmp/potion-slurm/slurm.conf PATH=...
# Settings (environment): POTION_SLURM_DIR, POTION_SLURM_CPUS (2), POTION_SLURM_MEM_MB (90 % of RAM),
# POTION_SLURM_PORT (6817; slurmd uses the next port), POTION_SLURM_PARTITION (debug).
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # munged, slurmctld and slurmd live there; a user PATH may lack it

DIR="${POTION_SLURM_DIR:-/tmp/potion-slurm}"
CPUS="${POTION_SLURM_CPUS:-2}"
PORT="${POTION_SLURM_PORT:-6817}"
PARTITION="${POTION_SLURM_PARTITION:-debug}"
CONF="$DIR/slurm.conf"
SOCKET="$DIR/munge/munge.socket.2"
NODE="$(hostname -s)"
PACKAGES=(munge slurmctld slurmd slurm-client)

die() { echo "error: $*" >&2; exit 2; }
log() { echo "slurm_cluster: $*" >&2; }

default_mem_mb() {
    # 90 % of the machine's memory: enough for a few potion jobs, and no more than slurmd can find.
    awk '/^MemTotal:/ { printf "%d\n", $2 / 1024 * 0.9 }' /proc/meminfo
}

install_if_missing() {
    local missing=0 cmd
    for cmd in munged slurmctld slurmd sbatch scontrol; do
        command -v "$cmd" >/dev/null 2>&1 || missing=1
    done
    [ "$missing" = 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "slurm or munge is not installed, and installing them needs root (apt-get)"
    command -v apt-get >/dev/null 2>&1 || die "slurm or munge is not installed, and this machine has no apt-get"
    log "installing ${PACKAGES[*]} (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >"$DIR/apt.log" 2>&1 || die "apt-get update failed (see $DIR/apt.log)"
    # policy-rc.d 101: the packages' own init scripts must not start a second, system-wide munged/slurmd.
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
    fi
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >>"$DIR/apt.log" 2>&1 || {
        [ "$own_policy" = 1 ] && rm -f "$policy"
        die "apt-get install ${PACKAGES[*]} failed (see $DIR/apt.log)"
    }
    [ "$own_policy" = 1 ] && rm -f "$policy"
    return 0
}

write_munge_key() {
    mkdir -p "$DIR/munge"
    chmod 700 "$DIR/munge"
    if [ ! -s "$DIR/munge/munge.key" ]; then
        head -c 1024 /dev/urandom >"$DIR/munge/munge.key.tmp"
        chmod 400 "$DIR/munge/munge.key.tmp"
        mv "$DIR/munge/munge.key.tmp" "$DIR/munge/munge.key"
    fi
}

write_slurm_conf() {
    local mem="${POTION_SLURM_MEM_MB:-$(default_mem_mb)}"
    mkdir -p "$DIR/ctld" "$DIR/spool" "$DIR/log"
    cat >"$CONF.tmp" <<EOF
# Written by scripts/slurm_cluster.sh: one node ($NODE) on 127.0.0.1, everything under $DIR.
ClusterName=potion
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$SOCKET
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# No cgroups (containers, CI runners): plain process tracking, no task binding, no accounting daemon.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# The node reports what is configured here, whatever the hardware says (a CI runner may have fewer cores).
SlurmdParameters=config_overrides
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=3600
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
}

write_sacct() {
    # This cluster keeps no accounting database (slurmdbd), so the real sacct only says so. submitit asks
    # `sacct -o JobID,State,NodeList --parsable2 -j <id>...` to learn that a job died without writing its result
    # (an error exit, a time-out); with no answer it waits forever. This sacct answers those three columns
    # from slurmctld's memory of recent jobs (scontrol; finished jobs are kept MinJobAge seconds).
    mkdir -p "$DIR/bin"
    {
        echo '#!/usr/bin/env bash'
        echo '# Written by scripts/slurm_cluster.sh: JobID|State|NodeList of the jobs given with -j, from scontrol.'
        echo "export SLURM_CONF='$CONF'"
        cat <<'SACCT'
ids=()
while [ $# -gt 0 ]; do
    case "$1" in
        -j|--jobs) ids+=("${2//,/ }"); shift 2 ;;
        -j*) ids+=("${1#-j}"); shift ;;
        --jobs=*) ids+=("${1#--jobs=}"); shift ;;
        *) shift ;;
    esac
done
echo "JobID|State|NodeList"
for id in ${ids[@]+${ids[@]}}; do
    scontrol -o show job "$id" 2>/dev/null | awk '{
        split("", f)
        for (i = 1; i <= NF; i++) { k = index($i, "="); if (k) f[substr($i, 1, k - 1)] = substr($i, k + 1) }
        id = f["JobId"]
        if (f["ArrayTaskId"] != "" && f["ArrayTaskId"] != "N/A") {
            t = f["ArrayTaskId"]
            id = f["ArrayJobId"] "_" (t ~ /^[0-9]+$/ ? t : "[" t "]")
        }
        print id "|" f["JobState"] "|" f["NodeList"]
    }'
done
SACCT
    } >"$DIR/bin/sacct.tmp"
    chmod +x "$DIR/bin/sacct.tmp"
    mv "$DIR/bin/sacct.tmp" "$DIR/bin/sacct"
}

env_lines() {
    echo "export SLURM_CONF=$CONF"
    echo "export PATH=$DIR/bin:\$PATH"
}

pid_alive() {  # pid_alive <pid file>: the daemon whose id the file holds is running
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

start_munge() {
    pid_alive "$DIR/munged.pid" && return 0
    munged --force --key-file="$DIR/munge/munge.key" --socket="$SOCKET" --pid-file="$DIR/munged.pid" \
        --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" \
        || die "munged did not start (see $DIR/log/munged.log)"
    munge -n -S "$SOCKET" | unmunge -S "$SOCKET" >/dev/null || die "munge does not answer on $SOCKET"
}

start_slurm() {
    pid_alive "$DIR/slurmctld.pid" || slurmctld -f "$CONF" || die "slurmctld did not start (see $DIR/log/slurmctld.log)"
    pid_alive "$DIR/slurmd.pid" || slurmd -f "$CONF" -N "$NODE" || die "slurmd did not start (see $DIR/log/slurmd.log)"
}

wait_for_node() {
    # The node is usable once the controller answers and lists it idle (or busy with jobs).
    local state="" i
    for i in $(seq 60); do
        state="$(SLURM_CONF="$CONF" sinfo -h -N -n "$NODE" -o %T 2>/dev/null || true)"
        case "$state" in
            idle*|mixed*|allocated*|completing*) log "up: node $NODE is $state ($CPUS CPUs, partition $PARTITION)"; return 0 ;;
        esac
        sleep 1
    done
    die "node $NODE did not become idle within 60 s (state: ${state:-no answer}; see $DIR/log/)"
}

stop_daemon() {  # stop_daemon <name>: TERM the pid in <name>.pid, KILL it after 15 s
    local pidfile="$DIR/$1.pid" pid i
    pid_alive "$pidfile" || { rm -f "$pidfile"; return 0; }
    pid="$(cat "$pidfile")"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 30); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    rm -f "$pidfile"
    log "stopped $1 ($pid)"
}

cmd_up() {
    mkdir -p "$DIR"
    install_if_missing
    write_munge_key
    write_slurm_conf
    write_sacct
    start_munge
    start_slurm
    wait_for_node
    env_lines
}

cmd_down() {
    [ -d "$DIR" ] || return 0
    if pid_alive "$DIR/slurmctld.pid"; then  # cancel leftover jobs, so slurmd leaves no job step behind
        SLURM_CONF="$CONF" scancel --full -u "$(id -un)" 2>/dev/null || true
        sleep 1
    fi
    stop_daemon slurmd
    stop_daemon slurmctld
    stop_daemon munged
}

cmd_status() {
    [ -f "$CONF" ] || { echo "down: no $CONF (run: $0 up)"; return 1; }
    SLURM_CONF="$CONF" scontrol ping 2>&1 | grep -q "UP" || { echo "down: the controller does not answer"; return 1; }
    echo "up: $(SLURM_CONF="$CONF" sinfo -h -N -o '%N %T %c CPUs %m MB, partition %P')"
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    env) env_lines ;;
    *) die "usage: $0 up|down|status|env" ;;
esac
