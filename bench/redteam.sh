#!/usr/bin/env bash
# The red team at full counts, with real processes: for each cheat (a)–(g), a
# cheating node serving blocks 0..15 next to an honest one serving 15..30,
# and a gateway that audits every session with its own engine and keeps
# routing through convicted nodes (--redteam-keep-cheats, measurement only),
# so that each of SESSIONS random sessions is audited. Then honest swarms of
# other kernel variants and thread counts, one of them with two nodes per
# span so that nodes audit each other over /hotpot/audit/1. Then what
# verification costs (hotpot bench --verification).
#
#   bash bench/redteam.sh [SESSIONS=200] [HONEST_SESSIONS=250] [SCALAR_SESSIONS=24]
#
# (0 sessions skips that part; the portable scalar kernels are ~10x slower,
# hence fewer sessions for the swarm that runs them.) Prints one table row
# per cheat (detection = failed first audits of the cheating node / its
# audited sessions) and per honest swarm (failed first audits and
# convictions of honest nodes, which must be 0).
set -euo pipefail
cd "$(dirname "$0")/.."
SESSIONS="${1:-200}"; HONEST_SESSIONS="${2:-250}"; SCALAR_SESSIONS="${3:-24}"
cargo build --release -p hotpot-cli --features redteam >&2
HOTPOT="$PWD/target/release/hotpot"
"$HOTPOT" pull smollm2-135m >/dev/null
WORK="$(mktemp -d)"
source bench/lib.sh
GATEWAY=""
stop_all() { [ -n "$GATEWAY" ] && kill "$GATEWAY" 2>/dev/null; GATEWAY=""; stop_nodes; }
trap 'stop_all; rm -rf "$WORK"' EXIT

# start_gateway JOIN -> sets URL
start_gateway() {
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "$HOTPOT" gateway --join "$1" --listen "127.0.0.1:$port" -t 1 --audit-rate 1 --redteam-keep-cheats \
        --evidence-dir "$WORK/evidence" >"$WORK/gateway.log" 2>&1 &
    GATEWAY=$!
    URL="http://127.0.0.1:$port"
    for _ in $(seq 1 600); do curl -sf "$URL/health" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "gateway did not start" >&2; cat "$WORK/gateway.log" >&2; return 1
}

# field JSON PYTHON-EXPRESSION(r) -> value
field() { python3 -c "import json,sys; r=json.loads(sys.argv[1]); print($2)" "$1"; }

HONEST_AUDITS=0; HONEST_FAILS=0; HONEST_CONVICTIONS=0
seed=1
echo "red team ($(date -u +%F), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) vCPUs; every session audited by the gateway, -t 1 each)"
if [ "$SESSIONS" -gt 0 ]; then
    echo
    echo "| cheat | audited sessions | caught (failed first audit) | detection | positions (min / median / max) | honest node's audits (failed) |"
    echo "| --- | ---: | ---: | ---: | --- | ---: |"
    for cheat in requantize-q4_0 requantize-q8_0 noise skip-block attention-window replay other-span alter-input; do
        NODE_ARGS=(--redteam "$cheat"); start_node 0..15 1; CHEAT_PEER=$NODE_PEER; BOOT=$NODE_ADDR
        NODE_ARGS=(); start_node 15..30 1 "$BOOT"; HONEST_PEER=$NODE_PEER
        start_gateway "$BOOT"
        r=$(python3 bench/redteam.py "$URL" "$SESSIONS" "$seed")
        seed=$((seed + 1))
        stop_all
        a=$(field "$r" "r['audits'].get('$CHEAT_PEER', {'pass': 0, 'fail': 0})")
        n=$(field "$r" "sum($a.values())"); caught=$(field "$r" "$a['fail']")
        h=$(field "$r" "r['audits'].get('$HONEST_PEER', {'pass': 0, 'fail': 0})")
        hn=$(field "$r" "sum($h.values())"); hf=$(field "$r" "$h['fail']")
        HONEST_AUDITS=$((HONEST_AUDITS + hn)); HONEST_FAILS=$((HONEST_FAILS + hf))
        echo "| $cheat | $n | $caught | $(field "$r" "f'{100 * $caught / max($n, 1):.1f} %'") | $(field "$r" "' / '.join(str(p) for p in r['positions'])") | $hn ($hf) |"
    done
fi

honest_row() {
    local name=$1 sessions=$2 r
    r=$(python3 bench/redteam.py "$URL" "$sessions" "$seed")
    seed=$((seed + 1))
    stop_all
    local n fails cheats
    n=$(field "$r" "sum(v['pass'] + v['fail'] for v in r['audits'].values())")
    fails=$(field "$r" "sum(v['fail'] for v in r['audits'].values())")
    cheats=$(field "$r" "r['cheats']")
    HONEST_AUDITS=$((HONEST_AUDITS + n)); HONEST_FAILS=$((HONEST_FAILS + fails)); HONEST_CONVICTIONS=$((HONEST_CONVICTIONS + cheats))
    echo "| $name | $sessions | $n | $fails | $cheats |"
}
if [ "$HONEST_SESSIONS" -gt 0 ] || [ "$SCALAR_SESSIONS" -gt 0 ]; then
    echo
    echo "| honest swarm (the gateway audits with avx512 -t 1) | sessions | audits | failed first audits | convictions |"
    echo "| --- | ---: | ---: | ---: | ---: |"
fi
if [ "$HONEST_SESSIONS" -gt 0 ]; then
    NODE_ENV=(HOTPOT_KERNELS=avx2); start_node 0..15 2; BOOT=$NODE_ADDR
    NODE_ENV=(); start_node 15..30 1 "$BOOT"
    start_gateway "$BOOT"
    honest_row "0..15 avx2 -t 2, 15..30 avx512 -t 1" "$HONEST_SESSIONS"
    NODE_ENV=(HOTPOT_KERNELS=avx2); start_node 0..15 1; BOOT=$NODE_ADDR
    NODE_ENV=(); start_node 0..15 2 "$BOOT"
    NODE_ENV=(HOTPOT_KERNELS=avx2); start_node 15..30 2 "$BOOT"
    NODE_ENV=(); start_node 15..30 1 "$BOOT"
    start_gateway "$BOOT"
    honest_row "two nodes per span (avx2 -t 1 / avx512 -t 2, avx2 -t 2 / avx512 -t 1), auditing each other" "$HONEST_SESSIONS"
fi
if [ "$SCALAR_SESSIONS" -gt 0 ]; then
    NODE_ENV=(HOTPOT_KERNELS=scalar); start_node 0..15 1; BOOT=$NODE_ADDR
    NODE_ENV=(HOTPOT_KERNELS=scalar); start_node 15..30 2 "$BOOT"
    NODE_ENV=(); start_gateway "$BOOT"
    honest_row "0..15 scalar -t 1, 15..30 scalar -t 2" "$SCALAR_SESSIONS"
fi
echo
echo "honest audits in all: $HONEST_AUDITS, failed first audits: $HONEST_FAILS, honest nodes convicted: $HONEST_CONVICTIONS"
echo
echo "what verification costs (CANDLE_NUM_THREADS unused: threads set with -t):"
"$HOTPOT" bench smollm2-135m --verification -t 1,2 -r 5 --sessions 24
