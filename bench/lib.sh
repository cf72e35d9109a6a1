# Helpers for the benchmark scripts: start `hotpot node` processes and read
# the figures `hotpot run` prints. Source it; it needs $HOTPOT and $WORK.

PIDS=()
# Extra arguments and environment (VAR=value) for the next start_node.
NODE_ARGS=()
NODE_ENV=()

# start_node BLOCKS THREADS [JOIN] [NETNS] -> sets NODE_ADDR and NODE_PEER (and appends to PIDS)
start_node() {
    local blocks=$1 threads=$2 join=${3:-} netns=${4:-} listen_ip=${5:-127.0.0.1}
    local log="$WORK/node-${blocks/../-}-$RANDOM.log"
    local cmd=(env "${NODE_ENV[@]}" "$HOTPOT" node --model "${NODE_MODEL:-smollm2-135m}" --blocks "$blocks" --listen "/ip4/$listen_ip/udp/0/quic-v1" -t "$threads" "${NODE_ARGS[@]}")
    [ -n "$join" ] && cmd+=(--join "$join")
    if [ -n "$netns" ]; then
        ip netns exec "$netns" "${cmd[@]}" >"$log" 2>&1 &
    else
        "${cmd[@]}" >"$log" 2>&1 &
    fi
    PIDS+=($!)
    for _ in $(seq 1 600); do
        if grep -q "^serving blocks" "$log"; then
            NODE_ADDR=$(grep -m1 "^listening on" "$log" | awk '{print $3}')
            NODE_PEER=${NODE_ADDR##*/p2p/}
            return 0
        fi
        sleep 0.1
    done
    echo "node $blocks did not start; log:" >&2
    cat "$log" >&2
    return 1
}

stop_nodes() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    PIDS=()
}

# decode_rate LOG -> tokens/s after the first token, from hotpot run's timings line
decode_rate() { grep -o 'decode [0-9.]* tok/s' "$1" | tail -1 | awk '{print $2}'; }
# first_token_ms LOG
first_token_ms() { grep -o 'first token after [0-9.]* ms' "$1" | tail -1 | awk '{print $4}'; }

# median of the numbers given as arguments
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

# An HTTP server under test (its pid in $SERVER): stop it, or wait until
# its OpenAI API at URL answers /models.
stop() { [ -n "${SERVER:-}" ] && kill "$SERVER" 2>/dev/null; wait 2>/dev/null || true; SERVER=""; }
wait_for() {
    for _ in $(seq 1 600); do
        curl -sf "$1/models" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "server at $1 did not come up" >&2; return 1
}
