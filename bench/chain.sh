#!/usr/bin/env bash
# The market contract's costs on a local anvil (issue 15): gas per settled
# receipt (a voucher covering 1, 10 or 100 receipts, 1 or 3 vouchers per
# transaction, sent by the gateway or by the node), gas per slash, settlement latency,
# the cost at stated gas prices, and the share of a node's earnings it
# takes. Target: settlement < 1 % of what a node earns at batch size 100.
#
# Assumptions, stated in the output: a receipt pays a node 0.5 credits
# (1,000 positions at the README's example price of 0.5 credits per 1,000),
# and one credit is 10^-6 of the chain's coin (the contract's default
# --wei-per-credit 10^12), so a receipt pays 5 x 10^-7 coin; gas at
# 10 gwei (Ethereum L1) and 0.01 gwei (a busy L2 rollup).
#
#   bash bench/chain.sh [ROUNDS=3]
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"
cargo build --release -p hotpot-cli >&2
HOTPOT="$PWD/target/release/hotpot"
[ -x contracts/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil ] || npm ci --prefix contracts --no-audit --no-fund --loglevel=error >&2
ANVIL="$PWD/contracts/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
WORK="$(mktemp -d)"
"$ANVIL" --host 127.0.0.1 --port "$PORT" >"$WORK/anvil.log" 2>&1 &
ANVIL_PID=$!
trap 'kill $ANVIL_PID 2>/dev/null; rm -rf "$WORK"' EXIT
for _ in $(seq 1 100); do
    curl -sf -X POST -H 'Content-Type: application/json' -d '{"jsonrpc":"2.0","id":1,"method":"eth_chainId","params":[]}' "http://127.0.0.1:$PORT" >/dev/null && break
    sleep 0.1
done
"$HOTPOT" chain bench --rpc "http://127.0.0.1:$PORT" --rounds "$ROUNDS" >"$WORK/bench.jsonl"

echo "Market contract on anvil $("$ANVIL" --version | head -1 | awk '{print $3}') ($(date -u +%F), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) vCPUs); $ROUNDS rounds per batch size"
echo
python3 - "$WORK/bench.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
earn = 0.5e-6  # coin per receipt: 0.5 credits at 10^-6 coin per credit
prices = [("10 gwei", 10e-9), ("0.01 gwei", 0.01e-9)]
print("| sent by | vouchers (nodes) | receipts per voucher | gas per transaction | gas per receipt | latency (ms, median) | " + " | ".join(f"cost per receipt at {n} (coin) | share of a node's pay at {n}" for n, _ in prices) + " |")
print("| --- | ---: | ---: | ---: | ---: | ---: | " + " | ".join("---: | ---:" for _ in prices) + " |")
for r in rows:
    if r["what"] == "settle":
        cells = []
        for _, p in prices:
            cost = r["gas_per_receipt"] * p
            cells += [f"{cost:.3g}", f"{100 * cost / earn:.3g} %"]
        print(f"| {r['by']} | {r['vouchers']} | {r['receipts_per_voucher']} | {r['gas_per_tx']:.0f} | {r['gas_per_receipt']:.0f} | {r['latency_ms_median']:.1f} | " + " | ".join(cells) + " |")
print()
for r in rows:
    if r["what"] == "first":
        print(f"The first settlement of {r['vouchers']} new (gateway, node) pairs: {r['gas_per_tx']} gas (it creates their storage; not counted above).")
    if r["what"] == "slash":
        print(f"Slash with 2 auditor signatures: {r['gas']} gas ({r['latency_ms']:.1f} ms); " + ", ".join(f"{r['gas'] * p:.3g} coin at {n}" for n, p in prices) + ".")
    if r["what"] == "deploy":
        print(f"Deployment: {r['gas']} gas.")
print()
print("Target: settlement < 1 % of a node's pay at batch size 100 (a settlement paying a node for 100 receipts), at 0.01 gwei:")
print()
for r in rows:
    if r["what"] == "settle" and r["receipts_per_voucher"] == 100:
        share = 100 * r["gas_per_receipt"] * 0.01e-9 / earn
        print(f"* sent by the {r['by']}, {r['vouchers']} node(s) in the transaction: {share:.3g} % — {'met' if share < 1 else 'NOT met'}")
PY
