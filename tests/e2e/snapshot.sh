# End-to-end tests of sandbox snapshots, run inside the nested harness by tests/e2e/run
# (busybox sh): a sandbox with a process counting in memory and a file on its disk is
# snapshotted; a sandbox started from the snapshot has the file, and the same process goes on
# counting from where it was, while the original runs on unchanged.
. /opt/ember/extra/lib.sh

case_a_sandbox_started_from_a_snapshot_continues_it() {
  export EMBER_STATE="$PWD/st"
  # orig is itself restored (from the automatic template): a snapshot of a restored sandbox.
  ember run --detach --name orig >>out 2>>err || { echo "    the sandbox did not start"; return 1; }
  ok=1
  in_sb orig sh -c 'echo written-before > /root/marker && sync' && start_counting orig || ok=0
  pid=$(in_sb orig cat /tmp/c.pid)
  before=$(in_sb orig tail -n 1 /tmp/c.log)
  [ $ok = 1 ] && ember snapshot orig snap >>out 2>>err || { echo "    the snapshot failed"; ok=0; }
  [ $ok = 1 ] && [ -f snap/state ] && [ -f snap/memory ] && [ -f snap/disk.qcow2 ] ||
    { echo "    the snapshot directory is incomplete: $(ls snap 2>&1)"; ok=0; }
  [ "$(command ember ls --json | grep -c '"state": "Running"')" = 1 ] || { echo "    orig is not running on"; ok=0; }
  [ $ok = 1 ] && ember run --detach --from-snapshot snap --name copy >>out 2>>err ||
    { echo "    the copy did not start"; ok=0; }
  if [ $ok = 1 ]; then
    [ "$(in_sb copy cat /root/marker)" = written-before ] || { echo "    the file written before is missing"; ok=0; }
    [ "$(in_sb copy cat /tmp/c.pid)" = "$pid" ] && in_sb copy kill -0 "$pid" ||
      { echo "    the counter (pid $pid) is not alive in the copy"; ok=0; }
    c1=$(in_sb copy tail -n 1 /tmp/c.log)
    sleep 1
    c2=$(in_sb copy tail -n 1 /tmp/c.log)
    [ "$c1" -ge "$before" ] && [ "$c2" -gt "$c1" ] ||
      { echo "    counted $before before the snapshot, then $c1 and $c2 in the copy"; ok=0; }
    [ "$(in_sb copy grep -c '^1$' /tmp/c.log)" = 1 ] || { echo "    the counter restarted in the copy"; ok=0; }
    # Each goes its own way: what the copy writes, the original does not see.
    in_sb copy sh -c 'echo copy-only > /root/mine' || ok=0
    in_sb orig test -e /root/mine && { echo "    the original sees the copy's file"; ok=0; }
    in_sb orig kill -0 "$pid" || { echo "    the original's counter died"; ok=0; }
  fi
  rm_sb orig copy
  [ $ok = 1 ]
}

# snapshot_of_a_new_sandbox NAME DIR: boots sandbox NAME, snapshots it into DIR, removes it.
snapshot_of_a_new_sandbox() {
  export EMBER_STATE="$PWD/st"
  ember run --detach --cold --name "$1" >>out 2>>err || { echo "    the sandbox did not start"; return 1; }
  ember snapshot "$1" "$2" >>out 2>>err
  ok=1
  expect_status 0 || ok=0
  rm_sb "$1"
  [ $ok = 1 ]
}

case_a_corrupt_snapshot_fails_cleanly() {
  snapshot_of_a_new_sandbox orig snap || return 1
  cp snap/state state.good
  printf 'X' | dd of=snap/state bs=1 seek=100 conv=notrunc 2>/dev/null
  ember run --detach --from-snapshot snap --name copy >>out 2>err2
  expect_status 1 && expect_in err2 "is corrupt: checksum mismatch" || return 1
  [ ! -e "$EMBER_STATE/sandboxes/copy" ] || { echo "    the failed start left its state directory"; return 1; }
  # A memory file that does not match the state.
  cp state.good snap/state
  dd if=snap/memory of=short bs=1M count=1 2>/dev/null && mv short snap/memory
  ember run --detach --from-snapshot snap --name copy >>out 2>err4
  expect_status 1 && expect_in err4 "is 1048576 bytes, the snapshot's guest has 268435456" || return 1
  [ ! -e "$EMBER_STATE/sandboxes/copy" ] || { echo "    the failed start left its state directory"; return 1; }
  ember snapshot orig snap2 >/dev/null 2>err3
  expect_status 1 && expect_in err3 "there is no sandbox named orig"
}

# A restore checks that the guest it brought up goes on from the snapshot: the agent that
# answers must have run at least as long as the snapshotted one had (guest.json). A guest.json
# claiming more than the guest can have stands for a guest that is someone else's state.
case_a_restore_that_is_not_the_snapshots_continuation_fails_loudly() {
  snapshot_of_a_new_sandbox orig snap || return 1
  grep -q '"agent_uptime_ms":[1-9]' snap/guest.json || { echo "    guest.json: $(cat snap/guest.json)"; return 1; }
  ember run --detach --from-snapshot snap --name good >>out 2>>err || { echo "    the honest restore failed"; return 1; }
  rm_sb good
  echo '{"agent_uptime_ms":999999999999}' >snap/guest.json
  ember run --detach --from-snapshot snap --name copy >>out 2>err2
  expect_status 1 && expect_in err2 "sandbox copy is not the continuation of its snapshot" &&
    expect_in err2 "the snapshot's had run 999999999999 ms" || return 1
  [ ! -e "$EMBER_STATE/sandboxes/copy" ] || { echo "    the failed start left its state directory"; return 1; }
}

run_cases "$0"
