#!/usr/bin/env bash
# Speed through NATs (issue 16): decode tokens/s and first-token time of a
# gateway reaching one node (all 30 blocks of SmolLM2-135M) over three kinds
# of route through the namespace test bed (scripts/natbed.sh, root only):
#
#   direct       node and gateway on the "internet"
#   hole-punched node behind the endpoint-independent NAT, gateway on the
#                internet: reached through the relay, then a hole punch
#   relayed      node behind the symmetric NAT, gateway behind the other
#                NAT: no hole punch works, every step goes through the relay
#
# Each route is checked (the gateway's /v1/hotpot/swarm) before it is
# measured. Target: relayed >= 80 % of direct decode speed at 0 ms added
# delay.
#
#   sudo bash bench/nat.sh [RUNS=3] [TOKENS=128]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS="${1:-3}"
TOKENS="${2:-128}"
cargo build --release -p hotpot-cli >&2
HOTPOT="$PWD/target/release/hotpot"
"$HOTPOT" pull smollm2-135m >/dev/null
NAME="hb$$"
WORK="$(mktemp -d)"
cleanup() { bash scripts/natbed.sh down "$NAME"; rm -rf "$WORK"; }
trap cleanup EXIT
bash scripts/natbed.sh up "$NAME" >&2
inet="$NAME-inet" h1="$NAME-h1" h2="$NAME-h2"

ip netns exec "$inet" "$HOTPOT" relay --listen /ip4/0.0.0.0/udp/4001/quic-v1 >"$WORK/relay.log" 2>&1 &
for _ in $(seq 1 100); do grep -q "peer id:" "$WORK/relay.log" && break; sleep 0.1; done
RELAY=$(grep "peer id:" "$WORK/relay.log" | awk '{print $3}')
via() { echo "/ip4/$1/udp/4001/quic-v1/p2p/$RELAY"; }

# One measured client: streams TOKENS tokens (end tokens banned), prints
# first-token seconds and decode tokens/s as JSON.
cat >"$WORK/client.py" <<'PY'
import json, sys, time, urllib.request
url, tokens = sys.argv[1], int(sys.argv[2])
body = json.dumps({"model": "smollm2-135m", "prompt": "Once upon a time", "max_tokens": tokens, "temperature": 0,
                   "stream": True, "logit_bias": {"0": -100, "2": -100}}).encode()
req = urllib.request.Request(url + "/v1/completions", body, {"Content-Type": "application/json"})
start = time.time(); first = None; n = 0
with urllib.request.urlopen(req, timeout=300) as r:
    for line in r:
        if line.startswith(b"data: {"):
            if json.loads(line[6:])["choices"][0]["text"]:
                n += 1
                if first is None:
                    first = time.time()
end = time.time()
print(json.dumps({"first_s": first - start, "tok_s": (n - 1) / (end - first), "tokens": n}))
PY

measure() { # label, node namespace, relay address seen from it, gateway namespace, relay address seen from it, expected route
    local label="$1" node_ns="$2" node_via="$3" gw_ns="$4" gw_via="$5" want="$6" port
    port=$((20000 + RANDOM % 20000))
    ip netns exec "$node_ns" "$HOTPOT" node --blocks 0..30 --listen /ip4/0.0.0.0/udp/0/quic-v1 --join "$node_via" -t 1 >"$WORK/$label-node.log" 2>&1 &
    local node_pid=$!
    ip netns exec "$gw_ns" "$HOTPOT" gateway --join "$gw_via" --listen "127.0.0.1:$port" -t 1 --no-audits >"$WORK/$label-gw.log" 2>&1 &
    local gw_pid=$!
    local url="http://127.0.0.1:$port" route=""
    for _ in $(seq 1 120); do
        ip netns exec "$gw_ns" curl -sf "$url/health" 2>/dev/null | grep -q '"ok"' && break
        sleep 0.5
    done
    ip netns exec "$gw_ns" python3 "$WORK/client.py" "$url" 8 >/dev/null   # warm up, opens the route
    for _ in $(seq 1 60); do
        route=$(ip netns exec "$gw_ns" curl -s "$url/v1/hotpot/swarm" | python3 -c 'import json,sys; print(json.load(sys.stdin)["nodes"][0]["reachability"])' 2>/dev/null || true)
        [ "$route" = "$want" ] && break
        sleep 0.5
    done
    if [ "$route" != "$want" ]; then
        echo "| $label | route is $route, not $want: not measured | | |"
    else
        for _ in $(seq 1 "$RUNS"); do ip netns exec "$gw_ns" python3 "$WORK/client.py" "$url" "$TOKENS"; done >"$WORK/$label.jsonl"
        python3 - "$label" "$route" "$WORK/$label.jsonl" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[3])]
print(f"| {sys.argv[1]} | {sys.argv[2]} | {statistics.median(r['tok_s'] for r in rows):.1f} | {1000 * statistics.median(r['first_s'] for r in rows):.0f} |")
PY
    fi
    kill "$gw_pid" "$node_pid" 2>/dev/null || true
    wait "$gw_pid" "$node_pid" 2>/dev/null || true
}

echo "SmolLM2-135M, one node (1 thread) serving all blocks, $TOKENS tokens, median of $RUNS ($(date -u +%F), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) vCPUs)"
echo
echo "| route | gateway sees | decode tok/s | first token (ms) |"
echo "| --- | --- | ---: | ---: |"
measure direct "$inet" "$(via 10.77.1.1)" "$inet" "$(via 10.77.1.1)" direct | tee "$WORK/direct.row"
measure hole-punched "$h1" "$(via 10.77.1.1)" "$inet" "$(via 10.77.1.1)" direct | tee "$WORK/punched.row"
measure relayed "$h2" "$(via 10.77.2.1)" "$h1" "$(via 10.77.1.1)" relayed | tee "$WORK/relayed.row"
python3 - "$WORK/direct.row" "$WORK/relayed.row" <<'PY'
import sys
def speed(path):
    cells = open(path).read().split("|")
    try:
        return float(cells[3])
    except (IndexError, ValueError):
        return None
d, r = speed(sys.argv[1]), speed(sys.argv[2])
print()
if d and r:
    print(f"Target (relayed >= 80 % of direct): {'met' if r >= 0.8 * d else 'NOT met'} — {100 * r / d:.0f} %.")
else:
    print("Target (relayed >= 80 % of direct): not measured (a route did not come up as expected).")
PY
