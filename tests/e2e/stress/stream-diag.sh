# Diagnosis for the 100 MiB stream that stalls (issue 21): the sandbox suite's first cases, then
# the stream with a watcher in the guest writing its state to the console.
. /opt/ember/extra/lib.sh
SB=e2e-sandbox
STATE=$HOME/.local/state/ember/sandboxes
case_run_detach_starts_a_sandbox_that_ls_lists() {
  ember run --detach --name $SB --mem-mib 512 >name 2>err
  expect_status 0 && expect_in name $SB || return 1
  ember ls >ls 2>&1
  grep -E "^$SB +Running" ls >/dev/null || { echo "    ls says:"; cat ls; return 1; }
  for f in api.sock vsock.sock disk.qcow2 console.log sandbox.json; do
    [ -e "$STATE/$SB/$f" ] || { echo "    $STATE/$SB/$f is missing"; return 1; }
  done
  ember run --detach --name $SB >/dev/null 2>err2
  expect_status 1 && expect_in err2 "already exists"
}

case_exec_reports_exit_codes_signals_and_keeps_streams_apart() {
  ember exec $SB -- python3 -c \
    'import sys; print(2**64); print("to-stderr", file=sys.stderr); sys.exit(3)' >eout 2>eerr </dev/null
  expect_status 3 && expect_in eout 18446744073709551616 && expect_in eerr to-stderr || return 1
  ! grep -q to-stderr eout || { echo "    stderr leaked into stdout"; return 1; }
  ember exec $SB -- sh -c 'kill -9 $$' </dev/null >/dev/null 2>&1
  expect_status 137 || return 1
  ember exec $SB -- no-such-command </dev/null >/dev/null 2>&1
  expect_status 127 || return 1
  ember exec $SB -- /etc/hostname </dev/null >/dev/null 2>&1
  expect_status 126 || return 1
  ember exec $SB --env GREETING=hi --cwd /tmp -- sh -c 'echo $GREETING from $(pwd)' </dev/null >eout 2>&1
  expect_in eout "hi from /tmp" || return 1
  ember exec $SB -t -- sh -c 'tty; stty size' </dev/null >eout 2>&1
  expect_status 0 && expect_in eout /dev/pts/ && expect_in eout "24 80" || return 1
  ember exec $SB --user nobody -- sh -c 'echo $(id -un) $PYTHONUNBUFFERED' </dev/null >eout 2>&1
  expect_status 0 && expect_in eout "nobody 1" || return 1
  ember exec $SB --user 1234:56 -- id </dev/null >eout 2>&1
  expect_in eout "uid=1234 gid=56" || return 1
  ember exec no-such-sandbox -- true </dev/null >/dev/null 2>eerr
  expect_status 125 && expect_in eerr "no sandbox named no-such-sandbox"
}

case_a_timeout_kills_the_whole_process_tree() {
  ember exec $SB --timeout 2 -- sh -c 'sleep 600 & sleep 601 & wait' </dev/null >/dev/null 2>&1
  expect_status 124 || return 1
  sleep 1
  ember exec $SB -- sh -c 'cat /proc/[0-9]*/cmdline 2>/dev/null | tr "\0" " "' </dev/null >procs
  ! grep -qE "sleep 60[01]" procs || { echo "    the timed-out command's children survive"; return 1; }
}

case_stream_with_a_watcher() {
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
