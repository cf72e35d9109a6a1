#!/usr/bin/env bash
# A NAT test bed in network namespaces (issue 16), for the NAT test and
# bench/nat.sh. Root only; addresses only in ranges these namespaces own.
#
#   bash scripts/natbed.sh up NAME      builds it (NAME: a short prefix, e.g. hp123)
#   bash scripts/natbed.sh down NAME    tears it down
#
#              NAME-inet  ("the internet": relay, gateway, public nodes)
#              10.77.1.1 ─┬─ 10.77.2.1 ─┬─ 10.77.3.1 ─┬─ 10.77.4.1
#                         │             │             │
#   NAME-r1 10.77.1.2 ────┘└── 10.77.2.2 NAME-r2   10.77.3.2 NAME-r3   10.77.4.2 NAME-r4
#   masquerade (endpoint-      masquerade random,fully-random (r2 and r3:   masquerade, as r1
#   independent mapping)       symmetric, a new port per destination)       (endpoint-independent)
#   192.168.71.1               192.168.72.1        192.168.73.1             192.168.74.1
#        │                          │                   │                        │
#   NAME-h1 192.168.71.2       NAME-h2 192.168.72.2  NAME-h3 192.168.73.2     NAME-h4 192.168.74.2
#   ("home 1")                 ("home 2")            ("home 3")               ("home 4")
#
# Every router drops what comes from the internet unless a flow from its
# home opened it. Between two symmetric homes no hole punch can work: their
# traffic stays relayed. Between homes 1 and 4 only a hole punch can make
# a direct route.
#
# Processes run inside with: ip netns exec NAME-h1 COMMAND…
set -euo pipefail
what="${1:?up or down}"
name="${2:?a short name for the namespaces}"
inet="$name-inet" r1="$name-r1" r2="$name-r2" r3="$name-r3" r4="$name-r4" h1="$name-h1" h2="$name-h2" h3="$name-h3" h4="$name-h4"

down() {
    for ns in "$h1" "$h2" "$h3" "$h4" "$r1" "$r2" "$r3" "$r4" "$inet"; do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    done
}

if [ "$what" = down ]; then
    down
    exit 0
fi
[ "$what" = up ] || { echo "usage: $0 up|down NAME" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "the NAT test bed needs root (network namespaces)" >&2; exit 1; }
command -v nft >/dev/null || { echo "nft is missing (apt-get install nftables)" >&2; exit 1; }
down
for ns in "$inet" "$r1" "$r2" "$r3" "$r4" "$h1" "$h2" "$h3" "$h4"; do
    ip netns add "$ns"
    ip -n "$ns" link set lo up
done
inside() { ip netns exec "$1" "${@:2}"; }

# One router per home: its WAN side on the internet, its LAN side at home.
link() { # router, wan-side /24 prefix, lan /24 prefix, home
    local router="$1" wan="$2" lan="$3" home="$4"
    ip link add "up$router" netns "$inet" type veth peer name wan netns "$router"
    ip link add lan netns "$router" type veth peer name eth0 netns "$home"
    ip -n "$inet" addr add "$wan.1/24" dev "up$router"
    ip -n "$inet" link set "up$router" up
    ip -n "$router" addr add "$wan.2/24" dev wan
    ip -n "$router" addr add "$lan.1/24" dev lan
    ip -n "$router" link set wan up
    ip -n "$router" link set lan up
    ip -n "$router" route add default via "$wan.1"
    inside "$router" sysctl -qw net.ipv4.ip_forward=1
    ip -n "$home" addr add "$lan.2/24" dev eth0
    ip -n "$home" link set eth0 up
    ip -n "$home" route add default via "$lan.1"
}
link "$r1" 10.77.1 192.168.71 "$h1"
link "$r2" 10.77.2 192.168.72 "$h2"
link "$r3" 10.77.3 192.168.73 "$h3"
link "$r4" 10.77.4 192.168.74 "$h4"
# The internet routes between the routers' WAN sides.
inside "$inet" sysctl -qw net.ipv4.ip_forward=1

# Home 1: plain masquerade (Linux keeps a flow's source port when it can,
# and reuses the mapping: endpoint-independent mapping, which hole
# punching needs), and home 4 the same. Homes 2 and 3: a random port for
# every new flow (symmetric).
for router in "$r1" "$r4"; do
    inside "$router" nft -f - <<'NFT'
table ip nat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" masquerade
    }
}
NFT
done
for router in "$r2" "$r3"; do
    inside "$router" nft -f - <<'NFT'
table ip nat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan" masquerade random,fully-random
    }
}
NFT
done
# Nothing from the internet reaches a home unless a flow from inside
# opened it (conntrack), as on a real home router. Nor does it reach the
# router itself: the input chain drops it before conntrack confirms a flow
# for it. (Otherwise the first packet of a hole punch, arriving before the
# home has sent its own, leaves an entry that takes the home's mapping,
# and the router picks another port for the home's answer.)
for router in "$r1" "$r2" "$r3" "$r4"; do
    inside "$router" nft -f - <<'NFT'
table ip filter {
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan" oifname "wan" accept
    }
    chain input {
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        iifname { "lo", "lan" } accept
    }
}
NFT
done
echo "NAT test bed $name up: $inet (10.77.1.1 to 10.77.4.1), $h1 behind $r1 and $h4 behind $r4 (endpoint-independent), $h2 behind $r2 and $h3 behind $r3 (symmetric)"
