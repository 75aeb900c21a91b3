#!/usr/bin/env bash
# A real single-host SLURM cluster (slurmctld + slurmd + munge, Debian's packages) with ALL of its
# state in one folder, so that users and CI can try pertvl's sbatch scripts for real.
#
#   slurm/local_cluster.sh install            # apt-get the packages when missing (root)
#   slurm/local_cluster.sh start  [STATE_DIR] # write configs, start munged, slurmctld, slurmd
#   slurm/local_cluster.sh status [STATE_DIR] # daemons alive? node state
#   slurm/local_cluster.sh env    [STATE_DIR] # prints `export SLURM_CONF=...` (eval it)
#   slurm/local_cluster.sh stop   [STATE_DIR] # cancel jobs, stop daemons by the PIDs in their pid files
#
# STATE_DIR defaults to $PERTVL_SLURM_STATE, else /tmp/pertvl-slurm. Ports: $PERTVL_SLURMCTLD_PORT
# (6817) and $PERTVL_SLURMD_PORT (6818). Runs as root (SlurmUser=root): no systemd, no cgroups,
# no accounting daemon (read job results with `scontrol show job ID` or STATE_DIR/log/jobcomp.txt).
# The recipe is the one measured in ../shared/notes/stack.md (Debian 12: slurm 22.05, munge 0.5).
set -euo pipefail

cmd="${1:-}"
STATE="${2:-${PERTVL_SLURM_STATE:-/tmp/pertvl-slurm}}"
CTLD_PORT="${PERTVL_SLURMCTLD_PORT:-6817}"
SLURMD_PORT="${PERTVL_SLURMD_PORT:-6818}"
PACKAGES=(slurmctld slurmd slurm-client munge)

die() { echo "local_cluster.sh: $*" >&2; exit 1; }

have_packages() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null && command -v mungekey >/dev/null
}

need_root() {
    [ "$(id -u)" = 0 ] || die "$1 needs root (SlurmUser=root, daemons bind privileged state)"
}

# The PID in a pid file if that process is alive, else nothing.
live_pid() {
    local f="$1" pid
    [ -s "$f" ] || return 1
    pid="$(tr -dc '0-9' <"$f")"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
    local limit="$1" what="$2"; shift 2
    local i
    for ((i = 0; i < limit * 10; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.1
    done
    die "timed out after ${limit}s waiting for $what (logs in $STATE/log)"
}

write_conf() {
    local host node_line
    host="$(hostname -s)"
    # The node line exactly as slurmd measures this machine (CPUs, sockets, memory).
    node_line="$(slurmd -C | head -n 1)"
    [[ "$node_line" == NodeName=* ]] || die "unexpected 'slurmd -C' output: $node_line"
    cat >"$STATE/slurm.conf" <<EOF
# Written by pertvl slurm/local_cluster.sh; all state lives in $STATE
ClusterName=pertvl-local
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=${STATE}/munge/munge.socket
CredType=cred/munge
StateSaveLocation=${STATE}/slurmctld
SlurmdSpoolDir=${STATE}/slurmd
SlurmctldPidFile=${STATE}/run/slurmctld.pid
SlurmdPidFile=${STATE}/run/slurmd.pid
SlurmctldLogFile=${STATE}/log/slurmctld.log
SlurmdLogFile=${STATE}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=${STATE}/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
MailProg=/bin/true
SchedulerParameters=batch_sched_delay=0
DependencyParameters=kill_invalid_depend
ReturnToService=2
KillWait=30
MinJobAge=600
${node_line} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=local Nodes=${host} Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    need_root start
    have_packages || die "SLURM/munge packages missing: run '$0 install' (apt-get, root)"
    if live_pid "$STATE/run/slurmctld.pid" >/dev/null; then
        echo "local SLURM cluster already running in $STATE"
        return 0
    fi
    mkdir -p "$STATE"/{munge,slurmctld,slurmd,log,run}
    STATE="$(cd "$STATE" && pwd -P)"
    # munged only serves a socket whose every parent folder is searchable by all (o+x).
    local dir="$STATE"
    while dir="$(dirname "$dir")" && [ "$dir" != / ]; do
        [ "$(( 0$(stat -c '%a' "$dir") & 1 ))" = 1 ] \
            || die "munged needs o+x on every parent of the state folder; $dir is $(stat -c '%A' "$dir"). Use another STATE_DIR (e.g. /tmp/pertvl-slurm)"
    done
    # munged refuses group/world-writable state; 755 everywhere it looks.
    chmod 755 "$STATE" "$STATE"/{munge,slurmctld,slurmd,log,run}
    if [ ! -s "$STATE/munge/munge.key" ]; then
        mungekey --create --keyfile="$STATE/munge/munge.key"
    fi
    chmod 600 "$STATE/munge/munge.key"
    if ! live_pid "$STATE/run/munged.pid" >/dev/null; then
        munged --socket="$STATE/munge/munge.socket" --key-file="$STATE/munge/munge.key" \
            --pid-file="$STATE/run/munged.pid" --log-file="$STATE/log/munged.log" \
            --seed-file="$STATE/munge/munged.seed"
    fi
    wait_for 10 "munged socket" test -S "$STATE/munge/munge.socket"
    write_conf
    export SLURM_CONF="$STATE/slurm.conf"
    slurmctld -f "$SLURM_CONF"
    wait_for 20 "slurmctld" scontrol ping
    slurmd -f "$SLURM_CONF"
    wait_for 30 "the node to become idle" node_idle
    echo "local SLURM cluster up: state in $STATE"
    echo "export SLURM_CONF=$SLURM_CONF"
}

node_idle() {
    local state
    state="$(sinfo -h -N -o '%T' | head -n 1)"
    case "$state" in
        idle* | mixed* | allocated*) return 0 ;;
        drain* | down*) scontrol update NodeName="$(hostname -s)" State=RESUME >/dev/null 2>&1 || true; return 1 ;;
        *) return 1 ;;
    esac
}

stop_pidfile() { # stop_pidfile NAME: TERM the PID in its pid file, KILL after 10 s
    local name="$1" f="$STATE/run/$1.pid" pid i
    pid="$(live_pid "$f")" || { rm -f "$f"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "$name (pid $pid) ignored SIGTERM for 10 s; sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

stop() {
    [ -d "$STATE" ] || { echo "no local SLURM state in $STATE"; return 0; }
    export SLURM_CONF="$STATE/slurm.conf"
    if live_pid "$STATE/run/slurmctld.pid" >/dev/null; then
        # Cancel what still runs so no slurmstepd outlives its daemons.
        local jobs
        jobs="$(squeue -h -o '%i' 2>/dev/null || true)"
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            for ((i = 0; i < 100; i++)); do
                [ -z "$(squeue -h -o '%i' 2>/dev/null || true)" ] && break
                sleep 0.1
            done
        fi
    fi
    stop_pidfile slurmd
    stop_pidfile slurmctld
    stop_pidfile munged
    echo "local SLURM cluster in $STATE stopped"
}

status() {
    local name pid rc=0
    for name in munged slurmctld slurmd; do
        if pid="$(live_pid "$STATE/run/$name.pid")"; then
            echo "$name: running (pid $pid)"
        else
            echo "$name: not running"
            rc=1
        fi
    done
    if [ "$rc" = 0 ]; then
        SLURM_CONF="$STATE/slurm.conf" sinfo -N -o '%N %T %c %m' || rc=1
    fi
    return "$rc"
}

install() {
    if have_packages; then
        echo "SLURM/munge packages already installed"
        return 0
    fi
    need_root install
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${PACKAGES[@]}"
}

case "$cmd" in
    install) install ;;
    start) start ;;
    stop) stop ;;
    status) status ;;
    env) echo "export SLURM_CONF=$STATE/slurm.conf" ;;
    *)
        echo "usage: $0 {install|start|stop|status|env} [STATE_DIR]" >&2
        exit 2
        ;;
esac
