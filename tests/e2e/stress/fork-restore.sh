# Stress loop for issue 21 (a forked child that was not its parent's copy): not one of the CI
# suites (tests/e2e/*.sh), run as
#   tests/e2e/run --repeat 20 tests/e2e/stress/fork-restore.sh
# Each round restores a parent from the automatic template, starts a counter in its memory and
# writes a file to its disk and to its tmpfs, snapshots it, then makes STRESS_EACH (10) forks and
# STRESS_EACH restores of that snapshot one after another, checking every child is the parent's
# continuation (the counter alive and counting on, both files there, its own hostname) before it is
# removed. A round prints "forks N/N, restores N/N" and a line per wrong child.
. /opt/ember/extra/lib.sh

STRESS_EACH=${STRESS_EACH:-10}

# continues CHILD PID FLOOR: CHILD has the parent's counter PID counting on from at least FLOOR,
# and the files written before.
continues() {
  in_sb "$1" kill -0 "$2" || { echo "    $1: the counter (pid $2) is not alive"; return 1; }
  c1=$(in_sb "$1" tail -n 1 /tmp/c.log)
  [ "$c1" -ge "$3" ] 2>/dev/null || { echo "    $1: counted $3 before, then '$c1'"; return 1; }
  [ "$(in_sb "$1" cat /root/marker /dev/shm/m)" = "disk
mem" ] || { echo "    $1: the files written before are missing"; return 1; }
  [ "$(in_sb "$1" hostname)" = "$1" ] || { echo "    $1: hostname is not its own"; return 1; }
  sleep 0.3
  c2=$(in_sb "$1" tail -n 1 /tmp/c.log)
  [ "$c2" -gt "$c1" ] 2>/dev/null || { echo "    $1: the counter stopped at $c1 ('$c2')"; return 1; }
}

case_every_fork_and_restore_is_its_parents_continuation() {
  export EMBER_STATE="$PWD/st"
  ember run --detach --name p >>out 2>>err || { echo "    the parent did not start"; return 1; }
  in_sb p sh -c 'echo disk > /root/marker && sync && echo mem > /dev/shm/m' && start_counting p ||
    { rm_sb p; return 1; }
  pid=$(in_sb p cat /tmp/c.pid)
  ember snapshot p snap >>out 2>>err || { echo "    the snapshot failed"; rm_sb p; return 1; }
  floor=$(in_sb p tail -n 1 /tmp/c.log)
  forks=0 restores=0 i=0
  while [ $i -lt "$STRESS_EACH" ]; do
    i=$((i + 1))
    if child=$(ember fork p 2>>err) && [ -n "$child" ]; then
      continues "$child" "$pid" "$floor" && forks=$((forks + 1))
      rm_sb "$child"
    else
      echo "    fork $i failed: $(tail -n 1 err)"
    fi
    if ember run --detach --from-snapshot snap --name r$i >>out 2>>err; then
      continues r$i "$pid" 5 && restores=$((restores + 1))
    else
      echo "    restore $i failed: $(tail -n 1 err)"
    fi
    rm_sb r$i
  done
  rm_sb p
  echo "    forks $forks/$STRESS_EACH, restores $restores/$STRESS_EACH"
  [ $forks = "$STRESS_EACH" ] && [ $restores = "$STRESS_EACH" ]
}

run_cases "$0"
