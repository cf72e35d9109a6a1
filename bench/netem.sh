#!/usr/bin/env bash
# Decode speed and time to first token over a slow network: the client in
# one network namespace, the nodes in another, a veth link between them
# delayed with `tc netem` (one-way delays of 0, 10, 25, 50 ms), for chains
# of 1, 2 and 3 nodes. The baseline for the latency work (speculative
# decoding, node-to-node push).
#
#   sudo bash bench/netem.sh [TOKENS=32] [DELAYS="0 10 25 50"]
#
# ROUTING=star (default: the client relays every hop, `--no-push`) or
# ROUTING=push (node to node). With tc netem only the client's link is
# delayed (the nodes share a namespace), so push rows mean something only
# with the emulated delay, which every process pays.
#
# Where the kernel has no netem qdisc, the script says so and every process
# (the nodes and the client) adds the delay itself instead
# (`--emulate-delay-ms`): every message it sends to a peer waits that long
# first, so a chain pays it on every hop, as on the wire.
set -euo pipefail
cd "$(dirname "$0")/.."
TOKENS="${1:-32}"
DELAYS="${2:-0 10 25 50}"
ROUTING="${ROUTING:-star}"
ROUTE_ARGS=()
[ "$ROUTING" = star ] && ROUTE_ARGS=(--no-push)
cargo build --release -p hotpot-cli >&2
HOTPOT="$PWD/target/release/hotpot"
WORK="$(mktemp -d)"
source bench/lib.sh
NS_C=hp-bench-client; NS_N=hp-bench-nodes
cleanup() { stop_nodes; ip netns del "$NS_C" 2>/dev/null || true; ip netns del "$NS_N" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
"$HOTPOT" pull smollm2-135m >/dev/null 2>&1

cleanup_ns() { ip netns del "$NS_C" 2>/dev/null || true; ip netns del "$NS_N" 2>/dev/null || true; }
cleanup_ns
ip netns add "$NS_C"; ip netns add "$NS_N"
ip link add hp-c0 type veth peer name hp-n0
ip link set hp-c0 netns "$NS_C"; ip link set hp-n0 netns "$NS_N"
ip -n "$NS_C" addr add 10.77.0.1/24 dev hp-c0; ip -n "$NS_N" addr add 10.77.0.2/24 dev hp-n0
for ns in "$NS_C" "$NS_N"; do ip -n "$ns" link set lo up; done
ip -n "$NS_C" link set hp-c0 up; ip -n "$NS_N" link set hp-n0 up

METHOD="tc netem on the veth link"
if ! ip netns exec "$NS_C" tc qdisc add dev hp-c0 root netem delay 1ms 2>"$WORK/netem.err"; then
    METHOD="delay emulated in every process, --emulate-delay-ms (tc netem unavailable here: $(head -1 "$WORK/netem.err"))"
else
    ip netns exec "$NS_C" tc qdisc del dev hp-c0 root
fi

set_delay() {
    local ms=$1
    [[ "$METHOD" == tc* ]] || return 0
    for pair in "$NS_C hp-c0" "$NS_N hp-n0"; do
        set -- $pair
        ip netns exec "$1" tc qdisc del dev "$2" root 2>/dev/null || true
        [ "$ms" -gt 0 ] && ip netns exec "$1" tc qdisc add dev "$2" root netem delay "${ms}ms"
    done
    return 0
}

PROMPT="Once upon a time, in a small village at the edge of a great forest"
echo "hotpot decode over a delayed link, $TOKENS tokens, 1 thread per node ($(date -u +%F), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) vCPUs)"
echo "method: $METHOD, routing: $ROUTING"
echo
echo "| nodes | one-way delay | first token (ms) | decode tok/s |"
echo "| ---: | ---: | ---: | ---: |"
for chain in "0..30" "0..15 15..30" "0..10 10..20 20..30"; do
    n=$(wc -w <<<"$chain")
    for ms in $DELAYS; do
        set_delay "$ms"
        extra=()
        [[ "$METHOD" == tc* ]] || extra=(--emulate-delay-ms "$ms")
        # The nodes are started for each delay: with emulation they add it too.
        NODE_ARGS=("${extra[@]}")
        BOOT=""
        for span in $chain; do
            start_node "$span" 1 "$BOOT" "$NS_N" 10.77.0.2
            [ -z "$BOOT" ] && BOOT=$NODE_ADDR
        done
        ip netns exec "$NS_C" "$HOTPOT" run smollm2-135m "$PROMPT" --temperature 0 -n "$TOKENS" -t 1 \
            --join "$BOOT" "${extra[@]}" "${ROUTE_ARGS[@]}" >/dev/null 2>"$WORK/run.log" || { cat "$WORK/run.log" >&2; exit 1; }
        echo "| $n | $ms ms | $(first_token_ms "$WORK/run.log") | $(decode_rate "$WORK/run.log") |"
        stop_nodes
    done
    set_delay 0
done
