# End-to-end tests of `ember serve` over real sandboxes, run inside the nested harness by
# tests/e2e/run (busybox sh, its wget as the HTTP client): a box idle past its
# idle_ttl_seconds is stopped (its VMM gone) and starts again when next used, its disk kept; a
# restarted server adopts the boxes the last one made. The SDK's own tests (tests/sdk) cover
# the API as a whole.
. /opt/ember/extra/lib.sh
API=http://127.0.0.1:8080/api/v2/sandboxes
EXTRA_LOGS="serve.log"

# serve: starts `ember serve` on 127.0.0.1:8080 (state in ./st) and waits until it answers.
serve() {
  ember serve --listen 127.0.0.1:8080 >>serve.log 2>&1 &
  server=$!
  n=0
  until wget -q -O /dev/null "$API/boxes" 2>/dev/null; do
    kill -0 $server 2>/dev/null && [ $n -lt 120 ] || { echo "    ember serve did not come up"; return 1; }
    sleep 1; n=$((n + 1))
  done
}

# post PATH JSON: POSTs JSON to the control plane, the answer on stdout.
post() { wget -q -O - --header "Content-Type: application/json" --post-data "$2" "$API$1"; }

# field NAME: the string value of JSON field NAME on stdin.
field() { sed -n "s/.*\"$1\": *\"\([^\"]*\)\".*/\1/p"; }

# run_in ID COMMAND: runs COMMAND in box ID over the data plane's SSE endpoint; prints its
# output events as they came (base64 data included).
run_in() {
  wget -q -O - --header "Content-Type: application/json" \
    --post-data "{\"command\": \"$2\"}" "http://127.0.0.1:8080/dataplane/$1/execute/stream/start"
}

# status_of NAME: the box's status.
status_of() { wget -q -O - "$API/boxes/$1" | field status; }

case_an_idle_box_stops_and_a_restarted_server_adopts_its_boxes() {
  export EMBER_STATE="$PWD/st"
  serve || return 1
  ok=1
  idle=$(post /boxes '{"name": "idle", "idle_ttl_seconds": 4}' | field id)
  busy=$(post /boxes '{"name": "kept", "idle_ttl_seconds": 0}' | field id)
  [ -n "$idle" ] && [ -n "$busy" ] || { echo "    the creates failed"; kill $server; return 1; }
  # Output "written" comes back base64-encoded: d3JpdHRlbg==.
  run_in "$idle" "echo written > /root/f && sync && echo written" >x1
  grep -q 'd3JpdHRlbg' x1 || { echo "    the command's output did not come:"; cat x1; ok=0; }
  # The restart: what the server knew comes back from its registry.
  kill $server; wait $server
  serve || return 1
  [ "$(status_of idle)" = ready ] && [ "$(status_of kept)" = ready ] ||
    { echo "    after the restart: idle $(status_of idle), kept $(status_of kept)"; ok=0; }
  grep -q "adopted 2 sandboxes" serve.log || { echo "    the server did not say it adopted them"; ok=0; }
  run_in "$busy" "echo adopted" >x2
  grep -q 'YWRvcHRlZA' x2 || { echo "    the adopted box did not run a command:"; cat x2; ok=0; }
  # Idle for 4 s (counted from the restart): stopped within a few more.
  n=0
  until [ "$(status_of idle)" = stopped ]; do
    n=$((n + 1))
    [ $n -lt 30 ] || { echo "    the idle box is still $(status_of idle)"; ok=0; break; }
    sleep 1
  done
  [ "$(status_of kept)" = ready ] || { echo "    the box with no idle TTL is $(status_of kept)"; ok=0; }
  # Used again, it starts again, its disk as it was.
  run_in "$idle" "cat /root/f" >x3
  grep -q 'd3JpdHRlbg' x3 || { echo "    the restarted box lost its file:"; cat x3; ok=0; }
  kill $server; wait $server
  command ember rm $(command ember ls | awk 'NR > 1 {print $1}') >/dev/null 2>&1
  [ $ok = 1 ]
}

run_cases "$0"
