# Diagnosis for the 100 MiB stream that stalled (issue 21), not a CI suite:
#   tests/e2e/run tests/e2e/stress/stream-diag.sh
# A sandbox as the sandbox suite's, then the stream of old (urandom through tee to tmpfs) with a
# watcher in the guest writing its memory and its processes' states to the console, the VMM's
# threads and exit counts; the case always fails, so that the runner prints all of it.
. /opt/ember/extra/lib.sh
SB=e2e-sandbox
STATE=$HOME/.local/state/ember/sandboxes
case_stream_with_a_watcher() {
  # As the sandbox suite starts its sandbox, and its timeout case leaves it.
  ember run --detach --name $SB --mem-mib 512 >name 2>err || { cat err; return 1; }
  ember exec $SB --timeout 2 -- sh -c 'sleep 600 & sleep 601 & wait' </dev/null >/dev/null 2>&1
  ember exec $SB -- sh -c 'while :; do { echo "@@ $(cat /proc/uptime)"; grep -E "MemFree|Shmem:|Dirty|MemAvail" /proc/meminfo | tr -s " " | tr "\n" " "; echo; for p in $(pidof ember-agent head tee); do echo "== $p $(cat /proc/$p/comm)"; for t in /proc/$p/task/*; do echo "  ${t##*/} $(cat $t/wchan) $(cut -d" " -f3,14,15 $t/stat)"; done; done; } >/dev/console 2>&1; sleep 4; done' </dev/null >/dev/null 2>&1 &
  sleep 1
  vmm=
  for p in /proc/[0-9]*; do tr '\0' ' ' <$p/cmdline 2>/dev/null | grep -q -- "--id $SB " && vmm=${p#/proc/}; done
  vthreads() { for t in /proc/$vmm/task/*; do echo "      $(cat $t/comm) $(cat $t/wchan) $(cut -d' ' -f3,14,15 $t/stat)"; done; }
  i=0
  while [ $i -lt 1 ]; do
    i=$((i + 1))
    timeout 250 ember exec $SB -- sh -c 'head -c 104857600 /dev/urandom | tee /tmp/blob' </dev/null >blob 2>err2
    r=$?
    echo "    round $i: exec ended $r with $(wc -c <blob) bytes at $(cut -d' ' -f1 /proc/uptime)"
    [ $r = 0 ] || break
    ember exec $SB -- rm -f /tmp/blob </dev/null
  done
  cat err2
  echo "    vmm $vmm threads:"; vthreads
  ember stats $SB 2>&1 | sed 's/^/    /'
  sleep 5
  vthreads
  ember stats $SB 2>&1 | sed 's/^/    /'
  ember exec $SB -- true </dev/null 2>&1 | sed 's/^/    after: /'
  echo "    --- console"; tail -c 20000 $STATE/$SB/console.log | sed 's/^/    /'
  echo "    --- vmm.log"; tail -30 $STATE/$SB/vmm.log | sed 's/^/    /'
  return 1
}
run_cases "$0"
