# End-to-end tests of forks, run inside the nested harness by tests/e2e/run (busybox sh): a
# running sandbox with a process counting in memory and a file on its disk is forked; each
# child has the file and the same process counting on from where it was, while the parent runs
# on; then parent and children go their own ways, in memory and on disk.
. /opt/ember/extra/lib.sh

# counts_on SANDBOX PID FLOOR: the counter PID is alive in SANDBOX, has counted at least to
# FLOOR, counts on, and never started over.
counts_on() {
  in_sb "$1" kill -0 "$2" || { echo "    $1: the counter (pid $2) is not alive"; return 1; }
  c1=$(in_sb "$1" tail -n 1 /tmp/c.log)
  sleep 1
  c2=$(in_sb "$1" tail -n 1 /tmp/c.log)
  [ "$c1" -ge "$3" ] && [ "$c2" -gt "$c1" ] || { echo "    $1: counted $3 before the fork, then $c1 and $c2"; return 1; }
  [ "$(in_sb "$1" grep -c '^1$' /tmp/c.log)" = 1 ] || { echo "    $1: the counter started over"; return 1; }
}

# sees SANDBOX FILE: FILE exists in SANDBOX.
sees() { in_sb "$1" test -e "$2"; }

case_children_go_on_from_the_parent_and_diverge() {
  export EMBER_STATE="$PWD/st"
  # Booted: its memory is frozen in place (a sandbox restored from a template, as in the next
  # case, already runs on a private mapping).
  ember run --detach --cold --name p >>out 2>>err || { echo "    the parent did not start"; return 1; }
  ok=1
  # On disk (synced and in the page cache) and in memory (tmpfs).
  in_sb p sh -c 'echo before > /root/marker && sync && echo mem-before > /dev/shm/m' && start_counting p || ok=0
  pid=$(in_sb p cat /tmp/c.pid)
  before=$(in_sb p tail -n 1 /tmp/c.log)
  # The children inherit the parent's kernel log: a mark it made before the fork is not theirs.
  unstable_before=$(in_sb p dmesg | grep -c "Marking clocksource 'tsc' as unstable")
  [ $ok = 1 ] && ember fork p -n 2 >children 2>>err || { echo "    the fork failed"; ok=0; }
  [ "$(cat children)" = "p-1
p-2" ] || { echo "    fork printed: $(cat children)"; ok=0; }
  [ "$(command ember ls --json | grep -c '"state": "Running"')" = 3 ] || { echo "    not all three run"; ok=0; }
  if [ $ok = 1 ]; then
    for sb in p p-1 p-2; do
      counts_on $sb "$pid" "$before" || ok=0
      [ "$(in_sb $sb cat /root/marker)" = before ] || { echo "    $sb: the file written before is missing"; ok=0; }
      [ "$(in_sb $sb cat /dev/shm/m)" = mem-before ] || { echo "    $sb: the tmpfs file written before is missing"; ok=0; }
    done
    # Each writes to disk and to memory; nobody else sees it.
    for sb in p p-1 p-2; do
      in_sb $sb sh -c "echo $sb > /root/own-$sb && sync && echo $sb > /dev/shm/own-$sb" || ok=0
    done
    for sb in p p-1 p-2; do
      for other in p p-1 p-2; do
        [ $sb = $other ] && continue
        sees $sb /root/own-$other && { echo "    $sb sees $other's file on disk"; ok=0; }
        sees $sb /dev/shm/own-$other && { echo "    $sb sees $other's file in memory"; ok=0; }
      done
      # Read back from the disk itself, not the page cache.
      in_sb $sb sh -c 'echo 3 > /proc/sys/vm/drop_caches' || ok=0
      [ "$(in_sb $sb cat /root/own-$sb /root/marker)" = "$sb
before" ] || { echo "    $sb: its own file did not reach its disk"; ok=0; }
    done
    # Their clocks went on together: the kernel still trusts the TSC against kvmclock (its
    # watchdog, every half second, has had a second of counting above to compare them).
    # Only a host whose own clocksource is the TSC keeps a guest's TSC and kvmclock in step
    # (KVM's master clock): elsewhere (the nested harness's middle machine, on QEMU's emulated
    # TSC) KVM re-bases kvmclock on the host's clock at each update, and cold-booted guests
    # mark their TSC unstable too (2 parents in 16 runs of this case, before any fork).
    host_clock=$(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)
    mkdir -p kept
    [ "$host_clock" = tsc ] || echo "    (TSC check skipped: this host's clocksource is $host_clock)" >>kept/p.clocksource
    [ "$host_clock" != tsc ] || for sb in p-1 p-2; do
      [ "$(in_sb $sb dmesg | grep -c "Marking clocksource 'tsc' as unstable")" -gt "$unstable_before" ] &&
        { echo "    $sb: the guest found its TSC out of step with kvmclock:"; in_sb $sb dmesg | grep -i -A3 'clocksource' | sed 's/^/      /'; ok=0; }
    done
    # Kept (for --show) whether or not the case fails.
    [ "$unstable_before" = 0 ] ||
      { in_sb p dmesg | grep -i -A3 'clocksource' | sed 's/^/parent before the fork: /' >>kept/p.clocksource; }
    # Each child is itself: its own hostname and its own random numbers.
    for sb in p-1 p-2; do
      [ "$(in_sb $sb hostname)" = $sb ] || { echo "    $sb has hostname $(in_sb $sb hostname)"; ok=0; }
    done
    r1=$(in_sb p-1 sh -c 'head -c 32 /dev/urandom | od -An -tx1')
    r2=$(in_sb p-2 sh -c 'head -c 32 /dev/urandom | od -An -tx1')
    [ -n "$r1" ] && [ "$r1" != "$r2" ] || { echo "    both children read the same random bytes: $r1"; ok=0; }
    p1=$(in_sb p-1 python3 -c 'import random; print(random.random())')
    p2=$(in_sb p-2 python3 -c 'import random; print(random.random())')
    [ "$p1" != "$p2" ] || { echo "    both children's Python drew $p1"; ok=0; }
  fi
  # The children outlive their parent, disk layer included.
  rm_sb p
  if [ $ok = 1 ]; then
    in_sb p-1 sh -c 'echo 3 > /proc/sys/vm/drop_caches' &&
      [ "$(in_sb p-1 cat /root/marker)" = before ] || { echo "    p-1 lost its disk with its parent"; ok=0; }
    counts_on p-1 "$pid" "$before" || ok=0
  fi
  [ "$(ls st/layers | wc -l)" = 1 ] || { echo "    layers after removing the parent: $(ls st/layers)"; ok=0; }
  rm_sb p-1 p-2
  [ "$(ls st/layers | wc -l)" = 0 ] || { echo "    layers left after removing everyone: $(ls st/layers)"; ok=0; }
  [ $ok = 1 ]
}

case_forks_of_forks_and_a_second_fork_of_the_parent() {
  export EMBER_STATE="$PWD/st"
  ember run --detach --name p >>out 2>>err || { echo "    the parent did not start"; return 1; }
  ok=1
  start_counting p || ok=0
  pid=$(in_sb p cat /tmp/c.pid)
  [ $ok = 1 ] && ember fork p >>out 2>>err || { echo "    the first fork failed"; ok=0; }
  # A child runs on a private mapping of frozen memory: its fork freezes a layer of its writes.
  [ $ok = 1 ] && in_sb p-1 sh -c 'echo gen1 > /dev/shm/g && echo gen1 > /root/g && sync' || ok=0
  [ $ok = 1 ] && ember fork p-1 >>out 2>>err || { echo "    the fork of the child failed"; ok=0; }
  [ $ok = 1 ] && in_sb p sh -c 'echo second > /dev/shm/s' || ok=0
  [ $ok = 1 ] && ember fork p >>out 2>>err || { echo "    the second fork of the parent failed"; ok=0; }
  if [ $ok = 1 ]; then
    [ "$(in_sb p-1-1 cat /dev/shm/g /root/g)" = "gen1
gen1" ] || { echo "    the grandchild misses its parent's writes"; ok=0; }
    [ "$(in_sb p-2 cat /dev/shm/s)" = second ] || { echo "    the second child misses what the parent wrote after the first fork"; ok=0; }
    sees p-2 /dev/shm/g && { echo "    the second child sees the first child's memory"; ok=0; }
    for sb in p p-1 p-1-1 p-2; do
      counts_on $sb "$pid" 5 || ok=0
    done
  fi
  rm_sb p p-1 p-1-1 p-2
  [ $ok = 1 ]
}

case_a_bad_fork_request_fails_cleanly() {
  export EMBER_STATE="$PWD/st"
  ember fork nope 2>err1
  expect_status 1 && expect_in err1 "there is no sandbox named nope" || return 1
  ember fork nope -n 0 2>err2
  expect_status 2 || return 1
  [ ! -e st/sandboxes ] || [ -z "$(ls st/sandboxes)" ] || { echo "    left: $(ls st/sandboxes)"; return 1; }
}

run_cases "$0"
