# Helpers for end-to-end suites run by busybox sh inside the nested harness.
# A suite defines case_* functions and ends with `run_cases "$0"`; each case runs in a fresh
# directory, and prints "ok NAME" or "FAILED NAME" with the evidence, then a summary line.

status=0

# Guests that boot the images of rootfs/build run, through their /sbin/ember-init, the shell
# script found on the raw "job" disk named by ember_job= on the kernel command line.
IMAGES=/opt/ember/images

# mkjob FILE SCRIPT: a raw disk holding SCRIPT, padded with NULs to whole sectors.
mkjob() {
  dd if=/dev/zero of="$1" bs=4096 count=1 2>/dev/null
  printf '%s\n' "$2" | dd of="$1" conv=notrunc 2>/dev/null
}

# boot ROOT_DRIVE_OPTIONS JOB_FILE [ember run options]: boots with the job as /dev/vdb.
boot() {
  root=$1 job=$2
  shift 2
  ember run --mem-mib 512 --drive "$root,root=on" --drive "path=$job,ro=on" \
    --cmdline "init=/sbin/ember-init ember_job=/dev/vdb" "$@" >>out 2>>err
}

# expect_status N: the last command's status (saved by run_case's wrapper) was N.
expect_status() {
  [ "$status" = "$1" ] && return 0
  echo "    expected exit status $1, got $status"
  return 1
}

# expect_in FILE TEXT: FILE contains TEXT.
expect_in() {
  grep -qF -- "$2" "$1" && return 0
  echo "    expected '$2' in $1"
  return 1
}

# COUNTER prints 1, 2, 3, ... ten times a second: its state lives only in its memory, which is
# what the snapshot and fork suites carry over.
COUNTER='import time
n = 0
while True:
    n += 1
    print(n, flush=True)
    time.sleep(0.1)'

# in_sb SANDBOX COMMAND...: runs COMMAND in SANDBOX, its output on stdout; a guest that
# stopped answering fails the case instead of hanging the suite.
in_sb() {
  sb=$1
  shift
  timeout 60 ember exec "$sb" -- "$@" </dev/null 2>>err
}

# rm_sb SANDBOX...: removes the sandboxes, keeping their VMM and console logs in kept/ for the
# case's report should it fail.
rm_sb() {
  mkdir -p kept
  for sb in "$@"; do
    for log in vmm console; do
      cp "${EMBER_STATE:-$HOME/.local/state/ember}/sandboxes/$sb/$log.log" "kept/$sb.$log.log" 2>/dev/null
    done
  done
  command ember rm "$@" >/dev/null 2>&1
}

# start_counting SANDBOX: the counter runs detached from the agent's session; waits until it
# has counted to 5.
start_counting() {
  in_sb "$1" sh -c 'setsid nohup python3 -c "$1" >/tmp/c.log 2>&1 </dev/null & echo $! >/tmp/c.pid' sh "$COUNTER" ||
    return 1
  n=0
  until [ "$(in_sb "$1" tail -n 1 /tmp/c.log)" -ge 5 ] 2>/dev/null; do
    n=$((n + 1))
    [ $n -lt 50 ] || { echo "    the counter never reached 5"; return 1; }
    sleep 0.2
  done
}

# Signs, since the case began, that the harness itself went wrong: the middle machine's kernel
# reporting errors of its own (its KVM runs on QEMU's emulation of AMD-V, which has crashed it:
# see tests/nested/README.md; the L2 guests' unhandled MSR writes are routine and left out), or
# a guest that triple-faulted, which is how that emulation corrupting a guest's state shows.
# $1: the number of kernel message lines there were; $2: a file made when the case began.
harness_trouble() {
  dmesg | tail -n +$(($1 + 1)) | grep -E 'BUG:|Oops|WARNING:|soft lockup|blocked for more than|general protection' |
    grep -v 'Unhandled [RW]DMSR'
  find "$(dirname "$2")" "$HOME/.local/state/ember" -type f -newer "$2" 2>/dev/null |
    xargs -r grep -l "the guest triple-faulted" 2>/dev/null | sed 's/$/: the guest triple-faulted/'
  # A guest whose vCPUs stopped making VM exits before its agent ever answered: seen only in
  # cold boots in the harness (176 exits into a boot that takes ~840, then none), as the triple
  # faults of its emulated AMD-V are (DESIGN.md, Forks).
  find "$(dirname "$2")" "$HOME/.local/state/ember" -type f -newer "$2" 2>/dev/null |
    xargs -r grep -l "made no VM exit to the VMM in a second" 2>/dev/null | sed 's/$/: the guest stopped making VM exits/'
}

# tests/e2e/run --repeat N / --case NAME / --show PATTERN write /opt/ember/extra/e2e-options.sh: each chosen case
# runs N times in this one middle machine (a stress loop for a flake).
E2E_REPEAT=1
E2E_CASE=
E2E_SHOW=
E2E_CASE_TIMEOUT=300
[ ! -f /opt/ember/extra/e2e-options.sh ] || . /opt/ember/extra/e2e-options.sh

run_cases() {
  passed=0
  failed=0
  troubled=
  cases=$(sed -n 's/^\(case_[a-z0-9_]*\)() *{.*/\1/p' "$1")
  [ -z "$E2E_CASE" ] || cases=$(echo "$cases" | grep -x "case_$E2E_CASE")
  [ -n "$cases" ] || { echo "e2e: no case named $E2E_CASE in $1"; return 1; }
  round=0
  all=
  while [ "$round" -lt "$E2E_REPEAT" ]; do
    round=$((round + 1))
    all="$all $cases"
  done
  for name in $all; do
    dir=$(mktemp -d)
    cd "$dir" || exit 1
    start=$(cut -d' ' -f1 /proc/uptime)
    seen=$(dmesg | wc -l)
    touch .started
    (
      # ember's status is kept for expect_status.
      ember() { command ember "$@"; status=$?; return $status; }
      "$name"
    ) >case.log 2>&1 &
    case_pid=$!
    # A case that hangs is stopped here, with what was running, rather than by the harness's
    # overall timeout with nothing said of it.
    waited=0
    while kill -0 $case_pid 2>/dev/null && [ $waited -lt "$E2E_CASE_TIMEOUT" ]; do
      sleep 1
      waited=$((waited + 1))
    done
    hung=
    if kill -0 $case_pid 2>/dev/null; then
      hung=1
      {
        echo "    the case hung: stopped after $E2E_CASE_TIMEOUT s; what ran then:"
        { ps -o pid,stat,time,args 2>/dev/null || ps; } | grep -v ' ps' | sed 's/^/      /'
        for d in "${EMBER_STATE:-$HOME/.local/state/ember}"/sandboxes/* "$dir"/st/sandboxes/*; do
          [ -d "$d" ] || continue
          for log in vmm console; do
            [ -s "$d/$log.log" ] && { echo "    --- $d/$log.log:"; tail -n 10 "$d/$log.log" | sed 's/^/    | /'; }
          done
        done
      } >>case.log 2>&1
      kill -9 $case_pid 2>/dev/null
      # Its commands and its sandboxes' VMMs, which would take the next cases' CPU.
      pkill -9 -f "ember " 2>/dev/null
    fi
    if wait $case_pid && [ -z "$hung" ]; then
      result=ok
      passed=$((passed + 1))
    else
      result=FAILED
      failed=$((failed + 1))
    fi
    end=$(cut -d' ' -f1 /proc/uptime)
    echo "$result ${name#case_} ($(awk "BEGIN{printf \"%.1f\", $end-$start}") s)"
    # --show PATTERN: the lines of the kept sandbox logs that match it, failed or not.
    [ -z "$E2E_SHOW" ] || grep -H -E "$E2E_SHOW" kept/* 2>/dev/null | sed 's/^/    show: /'
    if [ "$result" = FAILED ]; then
      sed 's/^/    /' case.log
      # A suite can name more logs to show in EXTRA_LOGS; rm_sb keeps sandboxes' logs.
      for f in out err $EXTRA_LOGS kept/*; do
        [ -f "$f" ] && { echo "    --- $f:"; tail -n 20 "$f" | sed 's/^/    | /'; }
      done
      trouble=$(harness_trouble "$seen" "$dir/.started")
      # Hangs have been the harness's (its emulated AMD-V under load), never a case's own:
      # the suite runs again, and the hang is on record above.
      [ -z "$hung" ] || trouble="$trouble
the case hung"
      if [ -n "$trouble" ]; then
        echo "    --- the harness went wrong meanwhile:"
        echo "$trouble" | tail -n 20 | sed 's/^/    | /'
        troubled="$troubled ${name#case_}"
      fi
    fi
    cd / && rm -rf "$dir"
  done
  echo "$passed passed, $failed failed"
  # tests/e2e/run runs such a suite again.
  [ -z "$troubled" ] || echo "e2e: the harness went wrong during:$troubled"
  [ "$failed" = 0 ]
}
