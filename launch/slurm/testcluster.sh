#!/usr/bin/env bash
# A throwaway SLURM cluster on this one machine, for tests and CI: munge, slurmctld and two slurmd daemons that
# emulate nodes n1 and n2 (multiple-slurmd), with private state, ports, munge socket and slurm.conf under BASE,
# so it touches no system configuration and several can run side by side.
#
#   launch/slurm/testcluster.sh up [BASE]       start, wait until both nodes are idle, print the SLURM_CONF line
#   launch/slurm/testcluster.sh down [BASE]     cancel its jobs, then stop every daemon it started, by PID
#   launch/slurm/testcluster.sh status [BASE]   sinfo + squeue
# BASE defaults to /tmp/megacrystal-slurm. Clients use the cluster with `export SLURM_CONF=BASE/slurm.conf`.
# Needs root (slurmd) and Debian's slurmctld slurmd slurm-client munge packages; no systemd (every daemon
# forks itself and writes a pid file). `up` stops whatever it started when it fails.
# Measured recipes: ../shared/docs/slurm-and-multinode-on-one-machine.md (beside the repository).
set -euo pipefail
ACTION=${1:-}
BASE=${2:-${MEGACRYSTAL_SLURM_BASE:-/tmp/megacrystal-slurm}}
CONF="$BASE/slurm.conf"
SOCKET="$BASE/munge/munge.socket"

say() { echo "[testcluster] $*" >&2; }
die() { say "error: $*"; exit 1; }

# Stop the daemons whose pid files are given, if each is still the program it names (file:program), by PID:
# SIGTERM to all, then SIGKILL to any still there after 10 s.
stop_pidfiles() {
    local item file prog pid pids=() alive
    for item in "$@"; do
        file=${item%%:*}; prog=${item#*:}
        [ -s "$file" ] || continue
        pid=$(cat "$file")
        if [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -q "$prog"; then
            kill "$pid" 2>/dev/null && pids+=("$pid") && say "stopping $prog (pid $pid)"
        fi
        rm -f "$file"
    done
    for _ in $(seq 100); do
        alive=0
        for pid in "${pids[@]}"; do
            if [ -d "/proc/$pid" ] && [ "$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null)" != Z ]; then alive=1; fi
        done
        [ "$alive" = 0 ] && return 0
        sleep 0.1
    done
    for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null && say "killed pid $pid (did not stop in 10 s)"; done
    return 0
}

down() {
    [ -d "$BASE" ] || return 0
    if [ -s "$BASE/pids/slurmctld.pid" ] && [ -f "$CONF" ]; then
        # Jobs first: their slurmstepd processes and trainers would outlive slurmd otherwise.
        local jobs
        jobs=$(SLURM_CONF="$CONF" timeout 10 squeue -h -o %i 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086
            SLURM_CONF="$CONF" timeout 10 scancel $jobs 2>/dev/null || true
            for _ in $(seq 100); do
                [ -z "$(SLURM_CONF="$CONF" timeout 5 squeue -h -o %i 2>/dev/null)" ] && break
                sleep 0.2
            done
            say "cancelled jobs: $(echo $jobs)"
        fi
    fi
    stop_pidfiles "$BASE/pids/slurmd-n1.pid:slurmd" "$BASE/pids/slurmd-n2.pid:slurmd" \
        "$BASE/pids/slurmctld.pid:slurmctld"
    stop_pidfiles "$BASE/munge/munged.pid:munged"
}

free_ports() {  # three free TCP ports
    python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

up() {
    [ "$(id -u)" = 0 ] || die "needs root (slurmd runs jobs as their users)"
    local cmd
    for cmd in munged mungekey munge slurmctld slurmd sbatch scontrol sinfo squeue scancel; do
        command -v "$cmd" >/dev/null || die "$cmd not found: apt-get install slurmctld slurmd slurm-client munge"
    done
    if [ -s "$BASE/pids/slurmctld.pid" ] && [ -d "/proc/$(cat "$BASE/pids/slurmctld.pid")" ]; then
        die "a cluster is already running in $BASE; run: $0 down $BASE"
    fi
    UP_OK=0
    trap '[ "$UP_OK" = 1 ] || { say "bring-up failed; stopping what was started"; down; }' EXIT
    mkdir -p "$BASE"/{state,spool/n1,spool/n2,log,pids,munge}
    chmod 755 "$BASE"  # munged runs as user munge and must reach its socket directory
    chown munge:munge "$BASE/munge"; chmod 711 "$BASE/munge"  # munged: the socket directory must be searchable by all

    # munge: a private daemon, key and socket (the system's /run/munge is left alone)
    if [ ! -s "$BASE/munge/munge.key" ]; then
        mungekey --create --keyfile="$BASE/munge/munge.key" 2>/dev/null \
            || dd if=/dev/urandom of="$BASE/munge/munge.key" bs=1024 count=1 status=none
    fi
    chown munge:munge "$BASE/munge/munge.key"; chmod 400 "$BASE/munge/munge.key"
    runuser -u munge -- munged --socket="$SOCKET" --key-file="$BASE/munge/munge.key" \
        --pid-file="$BASE/munge/munged.pid" --log-file="$BASE/munge/munged.log" \
        --seed-file="$BASE/munge/munged.seed"
    for _ in $(seq 50); do munge -S "$SOCKET" -n 2>/dev/null | unmunge -S "$SOCKET" >/dev/null 2>&1 && break; sleep 0.1; done
    munge -S "$SOCKET" -n | unmunge -S "$SOCKET" >/dev/null || die "munged does not answer on $SOCKET"

    local host ctld_port p1 p2 first_job
    host=$(hostname -s)
    read -r ctld_port p1 p2 <<< "$(free_ports)"
    first_job=$(( (RANDOM % 900 + 100) * 1000 ))  # job ids (and the default rendezvous ports) differ per cluster
    cat > "$CONF" <<EOF
# written by launch/slurm/testcluster.sh: two emulated nodes on $host
ClusterName=megacrystal
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again after cred_expire + 1 s (default 120 s)
AuthInfo=socket=$SOCKET,cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$BASE/state
SlurmdSpoolDir=$BASE/spool/%n
SlurmctldPidFile=$BASE/pids/slurmctld.pid
SlurmdPidFile=$BASE/pids/slurmd-%n.pid
SlurmctldLogFile=$BASE/log/slurmctld.log
SlurmdLogFile=$BASE/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
MpiDefault=none
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=300
FirstJobId=$first_job
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=$p1 CPUs=2 RealMemory=2000 State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=$p2 CPUs=2 RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
EOF
    slurmctld -f "$CONF" -c -i   # forks itself; -c: clean start, -i: ignore unreadable state
    slurmd -f "$CONF" -N n1
    slurmd -f "$CONF" -N n2
    local states=""
    for _ in $(seq 150); do
        states=$(SLURM_CONF="$CONF" sinfo -h -N -o '%t' 2>/dev/null | sort -u | tr '\n' ' ')
        [ "$states" = "idle " ] && [ "$(SLURM_CONF="$CONF" sinfo -h -N -o '%N' | sort -u | wc -l)" = 2 ] && break
        sleep 0.2
    done
    [ "$states" = "idle " ] || die "nodes not idle after 30 s (states: ${states:-none}); see $BASE/log"
    UP_OK=1
    say "up: nodes n1 n2 idle, slurmctld port $ctld_port, logs $BASE/log"
    echo "export SLURM_CONF=$CONF"
}

case "$ACTION" in
    up) up ;;
    down) down ;;
    status) SLURM_CONF="$CONF" sinfo -N; SLURM_CONF="$CONF" squeue ;;
    *) echo "usage: $0 up|down|status [BASE]" >&2; exit 2 ;;
esac
