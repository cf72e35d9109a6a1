#!/usr/bin/env bash
# Speed through NATs (issue 16): decode tokens/s and first-token time of a
# gateway reaching one node (all 30 blocks of SmolLM2-135M) over three kinds
# of route through the namespace test bed (scripts/natbed.sh, root only):
#
#   direct       node and gateway on the "internet"
#   hole-punched node behind the endpoint-independent NAT, gateway on the
#                internet: reached through the relay, then direct (a hole
#                punch, or the node dialing the public gateway, whichever
#                comes first)
#   relayed      node behind one symmetric NAT, gateway behind the other:
#                no hole punch works, every step goes through the relay
#
# The three routes are three separate swarms (one relay each) that run at
# the same time; each route is checked (its gateway's /v1/hotpot/swarm)
# before it is measured, and the requests alternate between the routes
# (direct, hole-punched, relayed, direct, …) so that a drifting machine
# affects all three alike. Target: relayed >= 80 % of direct decode speed
# at 0 ms added delay (the median of the per-round ratios).
#
#   sudo bash bench/nat.sh [ROUNDS=5] [TOKENS=128]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-5}"
TOKENS="${2:-128}"
cargo build --release -p hotpot-cli >&2
HOTPOT="$PWD/target/release/hotpot"
"$HOTPOT" pull smollm2-135m >/dev/null
NAME="hb$$"
WORK="$(mktemp -d)"
cleanup() { bash scripts/natbed.sh down "$NAME"; rm -rf "$WORK"; }
trap cleanup EXIT
bash scripts/natbed.sh up "$NAME" >&2
inet="$NAME-inet" h1="$NAME-h1" h2="$NAME-h2" h3="$NAME-h3"

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

# A route: its own relay (port), its node and gateway. Prints nothing;
# leaves the gateway's URL and namespace in $WORK/LABEL.{url,ns}.
start_route() { # label, relay port, node namespace, relay ip seen from it, gateway namespace, relay ip seen from it
    local label="$1" rport="$2" node_ns="$3" node_ip="$4" gw_ns="$5" gw_ip="$6" port relay
    ip netns exec "$inet" "$HOTPOT" relay --listen "/ip4/0.0.0.0/udp/$rport/quic-v1" >"$WORK/$label-relay.log" 2>&1 &
    for _ in $(seq 1 100); do grep -q "peer id:" "$WORK/$label-relay.log" && break; sleep 0.1; done
    relay=$(grep "peer id:" "$WORK/$label-relay.log" | awk '{print $3}')
    port=$((20000 + RANDOM % 20000))
    ip netns exec "$node_ns" "$HOTPOT" node --blocks 0..30 --listen /ip4/0.0.0.0/udp/0/quic-v1 \
        --join "/ip4/$node_ip/udp/$rport/quic-v1/p2p/$relay" -t 1 >"$WORK/$label-node.log" 2>&1 &
    ip netns exec "$gw_ns" "$HOTPOT" gateway --join "/ip4/$gw_ip/udp/$rport/quic-v1/p2p/$relay" \
        --listen "127.0.0.1:$port" -t 1 --no-audits --key "$WORK/$label-gw.key" >"$WORK/$label-gw.log" 2>&1 &
    echo "http://127.0.0.1:$port" >"$WORK/$label.url"
    echo "$gw_ns" >"$WORK/$label.ns"
}

# Waits for a route's gateway, warms it up and checks how it reaches its
# node; prints that route ("direct", "relayed", …).
check_route() { # label, expected route
    local label="$1" want="$2" url ns route=""
    url=$(cat "$WORK/$label.url") ns=$(cat "$WORK/$label.ns")
    for _ in $(seq 1 120); do
        ip netns exec "$ns" curl -sf "$url/health" 2>/dev/null | grep -q '"ok"' && break
        sleep 0.5
    done
    ip netns exec "$ns" python3 "$WORK/client.py" "$url" 8 >/dev/null 2>&1 || true   # opens the route
    for _ in $(seq 1 60); do
        route=$(ip netns exec "$ns" curl -s "$url/v1/hotpot/swarm" | python3 -c 'import json,sys; print(json.load(sys.stdin)["nodes"][0]["route"])' 2>/dev/null || true)
        [ "$route" = "$want" ] && break
        sleep 0.5
    done
    echo "$route"
}

start_route direct 4001 "$inet" 10.77.1.1 "$inet" 10.77.1.1
start_route punched 4002 "$h1" 10.77.1.1 "$inet" 10.77.1.1
start_route relayed 4003 "$h2" 10.77.2.1 "$h3" 10.77.3.1
declare -A seen
for pair in direct:direct punched:direct relayed:relayed; do
    label="${pair%%:*}" want="${pair##*:}"
    seen[$label]="$(check_route "$label" "$want")"
    [ "${seen[$label]}" = "$want" ] || echo "route $label is ${seen[$label]:-unknown}, not $want" >&2
done
for round in $(seq 1 "$ROUNDS"); do
    for label in direct punched relayed; do
        url=$(cat "$WORK/$label.url") ns=$(cat "$WORK/$label.ns")
        ip netns exec "$ns" python3 "$WORK/client.py" "$url" "$TOKENS" >>"$WORK/$label.jsonl"
    done
    echo "round $round of $ROUNDS done" >&2
done

echo "SmolLM2-135M, one node (1 thread) serving all blocks per route, $TOKENS tokens, $ROUNDS rounds alternating the routes ($(date -u +%F), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) vCPUs)"
echo
python3 - "$WORK" "${seen[direct]}" "${seen[punched]}" "${seen[relayed]}" <<'PY'
import json, statistics, sys
work, seen = sys.argv[1], dict(zip(["direct", "punched", "relayed"], sys.argv[2:5]))
want = {"direct": "direct", "punched": "direct", "relayed": "relayed"}
names = {"direct": "direct", "punched": "hole-punched", "relayed": "relayed"}
rows = {label: [json.loads(l) for l in open(f"{work}/{label}.jsonl")] for label in names}
print("| route | gateway sees | decode tok/s (median) | first token ms (median) |")
print("| --- | --- | ---: | ---: |")
for label, name in names.items():
    r = rows[label]
    print(f"| {name} | {seen[label]} | {statistics.median(x['tok_s'] for x in r):.1f} | {1000 * statistics.median(x['first_s'] for x in r):.0f} |")
ratios = [r["tok_s"] / d["tok_s"] for d, r in zip(rows["direct"], rows["relayed"])]
print()
print("relayed / direct per round: " + ", ".join(f"{100 * x:.0f} %" for x in ratios))
if any(seen[l] != want[l] for l in names):
    print("Target (relayed >= 80 % of direct): not measured (a route did not come up as expected).")
else:
    m = statistics.median(ratios)
    print(f"Target (relayed >= 80 % of direct): {'met' if m >= 0.8 else 'NOT met'} — median {100 * m:.0f} %.")
PY
