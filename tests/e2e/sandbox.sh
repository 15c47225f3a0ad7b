# End-to-end tests of detached sandboxes, the guest agent and the CLI on top of them, run inside
# the nested harness by tests/e2e/run (busybox sh): `ember run --detach` starts a Debian sandbox
# through its VMM's API socket, `ember exec` / `ember cp` reach its agent over vsock by name,
# `ember rm` ends it. The cases share one sandbox, started by the first and removed by the last.
. /opt/ember/extra/lib.sh
SB=e2e-sandbox
STATE=$HOME/.local/state/ember/sandboxes
EXTRA_LOGS="$STATE/$SB/vmm.log $STATE/$SB/console.log"

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

case_100_mib_of_output_arrive_with_a_matching_checksum() {
  # A 4 KiB random line repeated: the host knows what must arrive without the guest reading
  # /dev/urandom or checksumming 100 MiB, which in the harness's emulated guest takes minutes of
  # CPU when the host is loaded (the case is about the stream, not the guest's arithmetic).
  line=$(head -c 2048 /dev/urandom | od -An -tx1 -v | tr -d ' \n')
  ember exec $SB -- sh -c 'yes "$0" | head -c 104857600' "$line" </dev/null >blob 2>err
  expect_status 0 || return 1
  want=$(yes "$line" | head -c 104857600 | md5sum | cut -d' ' -f1)
  got=$(md5sum blob | cut -d' ' -f1)
  [ "$(wc -c <blob)" = 104857600 ] && [ "$got" = "$want" ] ||
    { echo "    $(wc -c <blob) bytes, md5 $got; $want expected"; return 1; }
}

case_stdin_is_piped_through() {
  echo "hello through stdin" | ember exec $SB -- cat >out1 2>&1
  expect_status 0 && expect_in out1 "hello through stdin" || return 1
  head -c 5242880 /dev/urandom >in
  ember exec $SB -- md5sum <in >out2 2>&1
  [ "$(cut -d' ' -f1 out2)" = "$(md5sum <in | cut -d' ' -f1)" ] || { echo "    md5 differs: $(cat out2)"; return 1; }
  # A command that never reads stdin ends, and so does ember, while our stdin stays open.
  mkfifo open-stdin
  sleep 60 >open-stdin &
  writer=$!
  ember exec $SB -- echo done <open-stdin >out3 2>&1
  r=$?
  kill $writer
  [ $r = 0 ] && expect_in out3 done
}

case_fifty_concurrent_execs_all_complete() {
  i=0
  while [ $i -lt 50 ]; do
    command ember exec $SB -- sh -c 'sleep 1; echo "exec $0 done"' $i </dev/null >out.$i 2>&1 &
    i=$((i + 1))
  done
  wait
  i=0
  while [ $i -lt 50 ]; do
    grep -qx "exec $i done" out.$i || { echo "    exec $i: $(cat out.$i)"; return 1; }
    i=$((i + 1))
  done
}

case_a_background_server_outlives_the_exec_that_started_it() {
  ember exec $SB -- sh -c 'cd /tmp && nohup python3 -m http.server 8123 >/tmp/server.log 2>&1 &' </dev/null
  expect_status 0 || return 1
  n=0
  until command ember exec $SB -- python3 -c \
      'import urllib.request; print(urllib.request.urlopen("http://127.0.0.1:8123/").status)' </dev/null >got 2>&1 &&
      grep -qx 200 got; do
    n=$((n + 1))
    [ $n -lt 20 ] || { echo "    the server is not answering: $(cat got)"; return 1; }
    sleep 1
  done
}

case_256_mib_files_go_up_and_come_back_intact() {
  head -c 268435456 /dev/urandom >big
  timeout 240 ember cp big $SB:/root/big 2>err
  status=$?
  expect_status 0 || return 1
  # The round trip's cmp proves both ways (a checksum in the emulated guest costs a minute).
  mkdir back
  timeout 240 ember cp $SB:/root/big back/ 2>err
  status=$?
  expect_status 0 || return 1
  cmp big back/big || return 1
  ember cp $SB:/root/no-such-file x 2>err
  expect_status 125 && expect_in err "no such file" && [ ! -e x ]
}

case_garbage_on_the_vsock_socket_and_malformed_frames_leave_it_serving() {
  uds=$STATE/$SB/vsock.sock
  send=/opt/ember/extra/uds-send
  printf 'GARBAGE\n' | $send "$uds" >r1
  [ ! -s r1 ] || { echo "    garbage got an answer: $(cat r1)"; return 1; }
  head -c 100000 /dev/urandom | $send "$uds" >/dev/null
  printf 'CONNECT 99999999999999\n' | $send "$uds" >r2
  ! grep -q "^OK" r2 || { echo "    a bad port was accepted"; return 1; }
  # To the agent: a frame whose body is not a request, then one that claims 2 GiB.
  printf 'CONNECT 1024\n\010\000\000\000GARBAGE!\377\377\377\177' | $send "$uds" >r3
  head -n 1 r3 | grep -q "^OK " || { echo "    no OK from CONNECT 1024"; return 1; }
  [ "$(wc -c <r3)" -gt "$(head -n 1 r3 | wc -c)" ] || { echo "    the agent did not answer the malformed frames"; return 1; }
  ember exec $SB -- echo still serving </dev/null >out 2>&1
  expect_status 0 && expect_in out "still serving"
}

case_no_shell_holds_the_console_and_a_killed_agent_comes_back() {
  # Sandboxes boot headless (ember-init's ember_headless): no shell starts on a console that
  # only goes to a log.
  ember exec $SB -- sh -c 'cat /proc/[0-9]*/comm' >comms 2>err </dev/null
  expect_status 0 || return 1
  ! grep -qxE 'bash|sh -i' comms || { echo "    a shell runs: $(tr '\n' ' ' <comms)"; return 1; }
  ember exec $SB -- sh -c 'for p in /proc/[0-9]*; do
      [ "$(cat $p/comm 2>/dev/null)" = ember-agent ] && kill -9 ${p#/proc/}; done' >/dev/null 2>&1 </dev/null
  # init starts it again a second later.
  i=0
  until ember exec $SB -- true >/dev/null 2>&1 </dev/null; do
    i=$((i + 1))
    [ $i -lt 20 ] || { echo "    the agent did not come back"; return 1; }
    sleep 0.5
  done
  ember exec $SB -- cat /run/ember-agent.log </dev/null | grep -c "listening on vsock" >starts
  [ "$(cat starts)" = 2 ] || { echo "    the agent's log shows $(cat starts) starts"; return 1; }
}

case_the_root_file_system_leaves_no_deferred_work() {
  # What a sandbox's kernel would do on its own later, every restore and fork of it does again:
  # no access times written for reads, no lazyinit thread prefetching block bitmaps.
  ember exec $SB -- sh -c 'grep " / " /proc/mounts; cat /proc/[0-9]*/comm' >out 2>err </dev/null
  expect_status 0 || return 1
  opts=$(awk '$2 == "/" {o = $4} END {print o}' out)
  for o in rw noatime noinit_itable no_prefetch_block_bitmaps; do
    case ",$opts," in *",$o,"*) ;; *) echo "    the root is mounted $opts, without $o"; return 1 ;; esac
  done
  ! grep -qx ext4lazyinit out || { echo "    ext4lazyinit runs"; return 1; }
}

case_a_larger_disk_fills_up_in_the_guest_not_on_the_host() {
  ember run --detach --name huge-disk --disk-gib 100000 >/dev/null 2>err
  expect_status 1 && expect_in err "give --disk-gib from 1 to" || return 1
  ember run --detach --name small-disk --disk-gib 1 >/dev/null 2>err
  expect_status 1 && expect_in err "never smaller than its image" || return 1
  [ ! -e "$STATE/huge-disk" ] && [ ! -e "$STATE/small-disk" ] || { echo "    a refused sandbox left its state"; return 1; }
  # On a state directory of its own: the harness's is a tmpfs of half its RAM, which ember
  # rightly finds too small for a 3 GiB disk.
  big=$PWD/big-state
  mkdir -p "$big" && mount -t tmpfs -o size=8g,mode=0700 big-state "$big" || return 1
  (
    # No spare VMMs: one would hold the file system.
    export EMBER_STATE=$big EMBER_SPARE_VMMS=0
    ember run --detach --name big-disk --disk-gib 3 >/dev/null 2>err
    expect_status 0 || { cat err; exit 1; }
    # ext4 grown online to the disk's end by the agent: well past the image's 2 GiB.
    ember exec big-disk -- df -k / </dev/null >df 2>&1
    kib=$(awk 'NR == 2 {print $2}' df)
    [ "${kib:-0}" -gt 2900000 ] || { echo "    the guest's root is not 3 GiB:"; cat df; exit 1; }
    # More than the image had free is there; more than the disk is not (ENOSPC in the guest).
    ember exec big-disk -- fallocate -l 2600M /big </dev/null >out 2>&1
    expect_status 0 || { cat out; exit 1; }
    ember exec big-disk -- fallocate -l 1G /more </dev/null >out 2>&1
    expect_status 1 && expect_in out "No space left" || exit 1
    ember disk info "$big/sandboxes/big-disk/disk.qcow2" >info 2>&1
    expect_in info "(3221225472 bytes)"
  )
  status=$?
  (export EMBER_STATE=$big; rm_sb big-disk)
  umount "$big" || { echo "    $big is still in use"; status=1; }
  return $status
}

case_a_sandbox_ends_when_its_ttl_is_over() {
  ember run --detach --name ttl-gone --ttl 15 >/dev/null 2>err && ember run --detach --name ttl-kept --ttl 15 --on-ttl keep >/dev/null 2>>err
  expect_status 0 || { cat err; return 1; }
  ember exec ttl-gone -- true </dev/null || {
    for log in vmm console; do echo "    --- ttl-gone's $log.log:"; tail -n 15 "$STATE/ttl-gone/$log.log" | sed 's/^/    | /'; done
    return 1
  }
  pid=$(sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' "$STATE/ttl-gone/sandbox.json")
  sleep 20
  # The VMM ended it on time, with no ember command running.
  state=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' /proc/$pid/status 2>/dev/null)
  [ -z "$state" ] || [ "$state" = Z ] || { echo "    the VMM (pid $pid) still runs past its --ttl"; return 1; }
  grep -q "deadline passed" "$STATE/ttl-gone/vmm.log" || { echo "    vmm.log says:"; tail -5 "$STATE/ttl-gone/vmm.log"; return 1; }
  ember ls >ls 2>&1
  ! grep -q "^ttl-gone " ls && grep -Eq "^ttl-kept +Expired" ls || { echo "    ls says:"; cat ls; return 1; }
  [ ! -e "$STATE/ttl-gone" ] && [ -e "$STATE/ttl-kept/disk.qcow2" ] || { echo "    state left or lost"; ls "$STATE"; return 1; }
  ember exec ttl-kept -- true </dev/null >/dev/null 2>err
  expect_status 125 && expect_in err "lifetime (--ttl) is over" || return 1
  ember rm ttl-kept && [ ! -e "$STATE/ttl-kept" ]
}

case_a_guest_whose_agent_never_starts_is_reported_with_its_progress() {
  # yes(1) as init: the guest runs, writing to its console, and no agent ever answers.
  ember run --detach --cold --name no-agent --ready-timeout 5 --cmdline "init=/usr/bin/yes" >/dev/null 2>err
  expect_status 1 && expect_in err "did not answer within 5 s" && expect_in err "VM exits to the VMM in a second" &&
    expect_in err "the guest runs" || return 1
  grep -qx y err || { echo "    the console's tail (yes's output) is not in the report"; return 1; }
  ember ls >ls 2>&1
  ! grep -q "^no-agent " ls || { echo "    ls says:"; cat ls; return 1; }
}

case_rm_stops_the_sandbox_and_deletes_its_state() {
  pid=$(sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' "$STATE/$SB/sandbox.json")
  [ -n "$pid" ] && [ -d /proc/$pid ] || { echo "    no running VMM recorded"; return 1; }
  ember rm $SB 2>err
  expect_status 0 || return 1
  [ ! -e "$STATE/$SB" ] || { echo "    $STATE/$SB is still there"; return 1; }
  ember ls >ls
  ! grep -q "^$SB " ls || { echo "    ls still lists it"; return 1; }
  state=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' /proc/$pid/status 2>/dev/null)
  [ -z "$state" ] || [ "$state" = Z ] || { echo "    the VMM (pid $pid) still runs"; return 1; }
  ember rm $SB 2>err
  expect_status 1 && expect_in err "no sandbox named"
}

run_cases "$0"
