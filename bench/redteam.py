"""Runs random completion sessions through a Hotpot gateway that audits every
session, waits for the audits to finish, and prints what the gateway's
/metrics say about each node's audits.

Usage: python3 bench/redteam.py GATEWAY_URL SESSIONS SEED

Each session: a prompt of 48..160 random words (so more than 64 positions,
where the attention-window cheat starts to matter), 16..128 new tokens at
temperature 0.8 with its own seed. Prints one JSON object:
{"sessions", "positions": [min, median, max], "audits": {peer: {"pass", "fail"}},
 "cheats": convictions}.
"""

import json
import random
import statistics
import sys
import time
import urllib.request

WORDS = (
    "the a river mountain city engine market bread song winter light stone garden letter doctor ship "
    "quietly because under between after before old new bright heavy small green distant careful "
    "run build write carry remember open follow answer measure paint travel borrow explain gather "
    "and or but while if then when where which who every many several few each other another"
).split()


def post(url, body):
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def audits(base):
    """{peer: {"pass": n, "fail": n}} and the conviction count, from /metrics."""
    text = urllib.request.urlopen(f"{base}/metrics", timeout=30).read().decode()
    per_peer, cheats = {}, 0
    for line in text.splitlines():
        if line.startswith("hotpot_audits_total{"):
            labels, value = line.rsplit(" ", 1)
            fields = dict(kv.split("=", 1) for kv in labels[len("hotpot_audits_total{"):-1].split(","))
            peer, result = fields["peer"].strip('"'), fields["result"].strip('"')
            per_peer.setdefault(peer, {"pass": 0, "fail": 0})[result] = int(float(value))
        elif line.startswith("hotpot_cheats_total "):
            cheats = int(float(line.split()[1]))
    return per_peer, cheats


def main():
    base, sessions, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    rng = random.Random(seed)
    positions, stages = [], 0
    for i in range(sessions):
        prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(48, 160)))
        body = {"model": "smollm2-135m", "prompt": prompt, "max_tokens": rng.randint(16, 128), "temperature": 0.8,
                "seed": rng.randrange(1 << 32)}
        answer = post(f"{base}/v1/completions", body)
        usage = answer["usage"]
        positions.append(usage["prompt_tokens"] + usage["completion_tokens"])
        if (i + 1) % 25 == 0:
            print(f"  {i + 1}/{sessions} sessions", file=sys.stderr, flush=True)
    # Every session has two stages to audit; wait until they are all done
    # (or nothing has moved for a minute: an audit that could not run).
    expected = 2 * sessions
    last, still = -1, time.monotonic()
    while True:
        per_peer, cheats = audits(base)
        done = sum(v["pass"] + v["fail"] for v in per_peer.values())
        if done >= expected:
            break
        if done != last:
            last, still = done, time.monotonic()
        elif time.monotonic() - still > 60:
            print(f"  only {done} of {expected} audits finished", file=sys.stderr)
            break
        time.sleep(0.5)
    print(json.dumps({"sessions": sessions, "positions": [min(positions), statistics.median(positions), max(positions)],
                      "audits": per_peer, "cheats": cheats}))


if __name__ == "__main__":
    main()
