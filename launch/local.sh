#!/usr/bin/env bash
# Train with torchrun: launch/local.sh NPROC CONFIG [--set key=value ...] [megacrystal train options]
#
# One machine (the default): torchrun --standalone picks a free rendezvous port, so several runs can share a
# machine. Several machines: run this once on every node with NPROC processes each, and either
#   static rendezvous:  --nnodes N --node-rank R --master-addr ADDR [--master-port PORT]      (same on every node
#                       except --node-rank; ADDR is node 0's address)
#   c10d rendezvous:    --nnodes N --rdzv-endpoint HOST[:PORT] [--rdzv-id ID] [--node-rank R]  (the torch
#                       elastic rendezvous; ranks are assigned by arrival)
# and optionally --local-addr ADDR (this node's address; default: the one it uses to reach the master) and
# --ifname IFACE (the network interface gloo uses; default: the one holding that address).
# Hosts whose hostname resolves to 127.0.0.1 (containers, some /etc/hosts setups) need this node's real address
# (torchrun --local-addr) and interface (GLOO_SOCKET_IFNAME) spelled out, and a c10d rendezvous must be told which
# node hosts its store (torch decides by the hostname): this script takes the address and interface from the
# routing table, and the store's host from --node-rank 0 (or from the endpoint being one of this host's addresses).
# Both go through `python -m megacrystal.launch.torchrun`: torchrun that forwards SIGTERM, SIGINT and SIGUSR1 to the
# trainers alone (plain torchrun kills their checkpoint writers and gives a save 30 s) and exits 75 after a stop
# request with a checkpoint. A lost node fails the run once a collective
# has waited $MEGACRYSTAL_DIST_TIMEOUT_S seconds (torch's default, 30 minutes, when unset).
set -euo pipefail
if [[ $# -lt 2 ]]; then
    echo "usage: launch/local.sh NPROC CONFIG [--nnodes N (--node-rank R --master-addr A | --rdzv-endpoint H:P)]" \
         "[--set key=value ...]" >&2
    exit 2
fi
NPROC="$1"; CONFIG="$2"; shift 2
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# Launcher options are taken out; everything else goes to `megacrystal train` in its original order.
NNODES="" NODE_RANK="" MASTER_ADDR_ARG="" MASTER_PORT_ARG="29500" RDZV_ENDPOINT="" RDZV_ID="megacrystal"
LOCAL_ADDR="" IFNAME=""
TRAIN_ARGS=()
while [[ $# -gt 0 ]]; do
    opt="$1"; val=""
    case "$opt" in
        --nnodes|--node-rank|--master-addr|--master-port|--rdzv-endpoint|--rdzv-id|--local-addr|--ifname)
            [[ $# -ge 2 ]] || { echo "launch/local.sh: $opt needs a value" >&2; exit 2; }
            val="$2"; shift 2 ;;
        --nnodes=*|--node-rank=*|--master-addr=*|--master-port=*|--rdzv-endpoint=*|--rdzv-id=*|--local-addr=*|--ifname=*)
            val="${opt#*=}"; opt="${opt%%=*}"; shift ;;
        --set|--config|--resume)  # options of `train` that take a value: never parse the value as ours
            TRAIN_ARGS+=("$1"); [[ $# -ge 2 ]] && TRAIN_ARGS+=("$2"); shift $(( $# >= 2 ? 2 : 1 )); continue ;;
        *) TRAIN_ARGS+=("$1"); shift; continue ;;
    esac
    case "$opt" in
        --nnodes) NNODES="$val" ;;
        --node-rank) NODE_RANK="$val" ;;
        --master-addr) MASTER_ADDR_ARG="$val" ;;
        --master-port) MASTER_PORT_ARG="$val" ;;
        --rdzv-endpoint) RDZV_ENDPOINT="$val" ;;
        --rdzv-id) RDZV_ID="$val" ;;
        --local-addr) LOCAL_ADDR="$val" ;;
        --ifname) IFNAME="$val" ;;
    esac
done

setup() {
    bash "$ROOT/launch/setup_env.sh"
    # One BLAS thread per rank by default (torchrun would otherwise warn that it sets this).
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}"
}

if [[ -z "$NNODES" ]]; then
    if [[ -n "$NODE_RANK$MASTER_ADDR_ARG$RDZV_ENDPOINT$LOCAL_ADDR$IFNAME" ]]; then
        echo "launch/local.sh: multi-node options need --nnodes" >&2; exit 2
    fi
    setup
    exec "$ROOT/.venv/bin/python" -m megacrystal.launch.torchrun --standalone --nproc-per-node "$NPROC" \
        -m megacrystal.launch.worker train --config "$CONFIG" ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}
fi

die() { echo "launch/local.sh: $*" >&2; exit 2; }
[[ "$NNODES" =~ ^[1-9][0-9]*$ ]] || die "--nnodes must be a positive integer, not '$NNODES'"
[[ -z "$NODE_RANK" || "$NODE_RANK" =~ ^[0-9]+$ ]] || die "--node-rank must be an integer, not '$NODE_RANK'"
[[ -z "$NODE_RANK" || "$NODE_RANK" -lt "$NNODES" ]] || die "--node-rank $NODE_RANK is not below --nnodes $NNODES"
if [[ -n "$MASTER_ADDR_ARG" && -n "$RDZV_ENDPOINT" ]]; then
    die "give either --master-addr (static rendezvous) or --rdzv-endpoint (c10d), not both"
elif [[ -n "$MASTER_ADDR_ARG" ]]; then
    [[ -n "$NODE_RANK" ]] || die "static rendezvous (--master-addr) needs --node-rank (0 .. $((NNODES - 1)))"
    RDZV_HOST="$MASTER_ADDR_ARG"
elif [[ -n "$RDZV_ENDPOINT" ]]; then
    RDZV_HOST="${RDZV_ENDPOINT%:*}"
    [[ "$RDZV_ENDPOINT" == *:* ]] || RDZV_ENDPOINT="$RDZV_ENDPOINT:29400"
else
    die "--nnodes needs --master-addr with --node-rank (static) or --rdzv-endpoint (c10d rendezvous)"
fi

# This host's IPv4 address toward $1 (the source address of the route to it; for a local address, itself).
source_addr() {
    local ip
    ip=$(getent ahostsv4 "$1" 2>/dev/null | awk 'NR == 1 {print $1}')
    [[ -n "$ip" ]] || return 0
    command -v ip >/dev/null || return 0
    ip -o route get "$ip" 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p'
}
# The interface that holds IPv4 address $1.
iface_of() { command -v ip >/dev/null && ip -o -4 addr show | awk -v a="$1" '{split($4, p, "/")} p[1] == a {print $2; exit}'; }
is_local_addr() { [[ -n "$(iface_of "$1")" ]]; }

setup
SRC="$(source_addr "$RDZV_HOST")"
LOCAL_ADDR="${LOCAL_ADDR:-$SRC}"
if [[ -n "$IFNAME" ]]; then
    export GLOO_SOCKET_IFNAME="$IFNAME"
elif [[ -z "${GLOO_SOCKET_IFNAME:-}" && -n "$LOCAL_ADDR" ]]; then
    IFNAME="$(iface_of "$LOCAL_ADDR" || true)"
    if [[ -n "$IFNAME" ]]; then export GLOO_SOCKET_IFNAME="$IFNAME"; fi
fi

RDZV=()
if [[ -n "$MASTER_ADDR_ARG" ]]; then
    RDZV=(--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR_ARG" --master-port "$MASTER_PORT_ARG")
    where="static rendezvous at $MASTER_ADDR_ARG:$MASTER_PORT_ARG, node rank $NODE_RANK"
else
    RDZV=(--rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID")
    [[ -n "$LOCAL_ADDR" ]] && RDZV+=(--local-addr "$LOCAL_ADDR")
    # torch decides who hosts the rendezvous store by resolving this machine's hostname, which fails when it
    # resolves to 127.0.0.1: say it explicitly when we know (node rank 0, or the endpoint is one of our addresses).
    host_ip=$(getent ahostsv4 "$RDZV_HOST" 2>/dev/null | awk 'NR == 1 {print $1}')
    if [[ -n "$NODE_RANK" ]]; then
        RDZV+=(--rdzv-conf "is_host=$([[ "$NODE_RANK" == 0 ]] && echo 1 || echo 0)")
    elif [[ -n "$host_ip" && "$host_ip" != 127.* ]]; then
        RDZV+=(--rdzv-conf "is_host=$(is_local_addr "$host_ip" && echo 1 || echo 0)")
    fi
    where="c10d rendezvous at $RDZV_ENDPOINT (id $RDZV_ID)"
fi
echo "[local.sh] $NNODES nodes x $NPROC processes, $where; local address ${LOCAL_ADDR:-?}," \
     "GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-unset}, collective timeout ${MEGACRYSTAL_DIST_TIMEOUT_S:-torch default, 30 min} s" >&2
exec "$ROOT/.venv/bin/python" -m megacrystal.launch.torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC" \
    "${RDZV[@]}" -m megacrystal.launch.worker train --config "$CONFIG" ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}
