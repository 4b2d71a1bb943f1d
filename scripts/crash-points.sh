#!/usr/bin/env bash
# Crash safety of the migration transaction (PROTOCOL §11.3), measured: for every crash point
# (`ROAM_CRASH_AT`, roam_host::CrashPoint), RUNS times: a bulk transfer bulk-send (on S) →
# bulk-recv (on E), `roam migrate` of the sender S → D with the crashing daemon (S or D, per the
# point's name) set to abort at that step; then where the sender ends up, how many copies of it
# run, and whether the receiver verified every byte.
#
#   scripts/crash-points.sh [RUNS=5] [ROAM_BINARY=target/release/roam] [BYTES=64M]
#   POINTS="dest-after-start" scripts/crash-points.sh 5   # some points only
#
# Loopback only (127.0.0.21-23). Prints one line per run and a summary table per point.
set -uo pipefail
runs="${1:-5}"
roam="${2:-target/release/roam}"
bytes="${3:-64M}"
all="source-after-offer source-after-freeze source-after-prepared source-after-commit
     dest-after-offer dest-mid-transfer dest-after-prepared dest-after-start"
read -r -a points <<<"${POINTS:-$(echo $all)}"

E=127.0.0.21:7000 S=127.0.0.22:7000 D=127.0.0.23:7000

declare -A summary
for point in "${points[@]}"; do
    for run in $(seq 1 "$runs"); do
        st="$(mktemp -d)"
        printf '%s\n' "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$st/deployment.key"
        pids=()
        for h in E S D; do
            addr="${!h}"
            env=()
            case "$point" in
                source-*) [ "$h" = S ] && env=(ROAM_CRASH_AT="$point") ;;
                dest-*) [ "$h" = D ] && env=(ROAM_CRASH_AT="$point") ;;
            esac
            env "${env[@]}" "$roam" host --listen "$addr" --state-dir "$st" >"$st/$h.out" 2>"$st/$h.err" &
            pids+=($!)
        done
        for _ in $(seq 100); do
            [ "$(ls "$st"/hosts/*/control.sock 2>/dev/null | wc -l)" -eq 3 ] && break
            sleep 0.05
        done
        recv=$("$roam" run bulk-recv --on "$E" --state-dir "$st")
        send=$("$roam" run bulk-send "$E/bulk" "$bytes" 3 --on "$S" --state-dir "$st")
        # Migrate once some data flowed.
        for _ in $(seq 100); do
            "$roam" ps --json --state-dir "$st" | grep -q '"status": "received [1-9]' && break
            sleep 0.05
        done
        "$roam" migrate "$send" --to "$D" --from "$S" --state-dir "$st" >"$st/migrate.out" 2>&1
        mrc=$?
        # Wait (≤ 60 s) until the receiver has a verdict or no daemon runs the sender.
        # "sender-gone" counts only once it held for 10 s (a destination asks the dead source
        # for up to 5 s before it starts the agent).
        verdict="none"
        gone=0
        for _ in $(seq 600); do
            out=$("$roam" ps --all --json --state-dir "$st" 2>/dev/null)
            v=$(python3 -c '
import json,sys
a=json.loads(sys.argv[1]); recv,send=sys.argv[2],sys.argv[3]
r=[x for x in a if x["id"]==recv]
s=[x for x in a if x["id"]==send and x["state"] in ("running","migrating","finished")]
st=r[0]["state"] if r else "gone"
if st in ("finished","failed"): print("recv-"+st+":"+r[0]["status"].replace(" ","_"))
elif not s: print("sender-gone:"+(r[0]["status"].replace(" ","_") if r else ""))
else: print("wait")' "$out" "$recv" "$send")
            case "$v" in
                wait) gone=0 ;;
                sender-gone:*) gone=$((gone + 1)); [ "$gone" -ge 100 ] && { verdict="$v"; break; } ;;
                *) verdict="$v"; break ;;
            esac
            sleep 0.1
        done
        out=$("$roam" ps --all --json --state-dir "$st" 2>/dev/null)
        where=$(python3 -c '
import json,sys
a=json.loads(sys.argv[1]); send=sys.argv[2]
live=[x["host"]+"="+x["state"] for x in a if x["id"]==send and x["state"] not in ("moved",)]
print(",".join(live) or "nowhere")' "$out" "$send")
        alive=""
        for i in 0 1 2; do kill -0 "${pids[$i]}" 2>/dev/null && alive="$alive${i}"; done
        crashed=$(grep -l "crash point" "$st"/*.err 2>/dev/null | xargs -r -n1 basename | tr '\n' ' ')
        echo "$point run $run: migrate rc=$mrc crashed=[${crashed}] sender at [$where] receiver: $verdict"
        key="$point|rc=$mrc|$(echo "$where" | sed 's/127.0.0.22:7000/S/g;s/127.0.0.23:7000/D/g')|${verdict%%:*}:$(echo "${verdict#*:}" | cut -c1-40)"
        summary[$key]=$(( ${summary[$key]:-0} + 1 ))
        for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
        wait 2>/dev/null
        rm -rf "$st"
    done
done
echo
echo "== summary (count | point | migrate exit | where the sender is | receiver's verdict)"
for k in "${!summary[@]}"; do echo "${summary[$k]} | $k"; done | sort -t'|' -k2
