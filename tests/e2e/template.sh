# End-to-end tests of templates, run inside the nested harness by tests/e2e/run (busybox sh):
# `ember template create` snapshots a freshly booted sandbox; sandboxes restored from it each
# answer as a machine of their own (hostname, random numbers, clock); templates are listed and
# removed, bad ones leave nothing behind; `ember run --detach` makes an automatic template once
# and restores from it after. The first cases share template t1; figures are printed at the end.
. /opt/ember/extra/lib.sh
STATE=$HOME/.local/state/ember
FIGURES=/tmp/template-figures
EXTRA_LOGS="err.1 err.6 err.k1 err.k2"
ms() { awk '{printf "%d", $1 * 1000}' /proc/uptime; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}'; }

# nothing_hidden_left: no sandbox or template being made or removed is left over.
nothing_hidden_left() {
  left=$(ls -A "$STATE/sandboxes" "$STATE/templates" 2>/dev/null | grep '^\.')
  [ -z "$left" ] || { echo "    left over: $left"; return 1; }
}

case_template_create_makes_a_template_that_ls_shows() {
  ember template create t1 >out 2>err
  expect_status 0 || return 1
  for f in state memory disk.qcow2 template.json; do
    [ -f "$STATE/templates/t1/$f" ] || { echo "    $STATE/templates/t1/$f is missing"; return 1; }
  done
  ember template ls >ls
  grep -qE "^t1 +[0-9]+s +256 +1  /opt/ember/images/default.ext4$" ls || { echo "    ls says:"; cat ls; return 1; }
  ember template ls --json >ls.json
  expect_in ls.json '"name": "t1"' && expect_in ls.json '"mem_mib": 256' || return 1
  # The sandbox it was made from is gone.
  [ -z "$(ls -A "$STATE/sandboxes")" ] || { echo "    sandboxes left: $(ls -A "$STATE/sandboxes")"; return 1; }
  ember template create t1 2>err2
  expect_status 1 && expect_in err2 "a template named t1 already exists"
}

case_twenty_sandboxes_from_one_template_each_answer_as_themselves() {
  ok=1
  # Five one after the other (timed), then fifteen five at a time.
  : >restore.ms
  for i in 1 2 3 4 5; do
    t0=$(ms)
    command ember run --detach --template t1 --name t$i >/dev/null 2>err.$i ||
      { echo "    t$i did not start:"; sed 's/^/      /' err.$i; ok=0; }
    echo $(($(ms) - t0)) >>restore.ms
  done
  for batch in "6 7 8 9 10" "11 12 13 14 15" "16 17 18 19 20"; do
    t0=$(ms)
    for i in $batch; do
      (command ember run --detach --template t1 --name t$i >/dev/null 2>err.$i || echo t$i >>failed) &
    done
    wait
    echo "restore from template, 5 at once: $(($(ms) - t0)) ms for the batch" >>batch.ms
  done
  if [ -s failed ]; then
    ok=0
    for t in $(cat failed); do echo "    $t did not start:"; sed 's/^/      /' "err.${t#t}"; done
  fi
  all=
  for i in $(seq 20); do
    all="$all t$i"
    [ "$(in_sb t$i hostname)" = t$i ] || {
      echo "    t$i: hostname '$(in_sb t$i hostname)'; its VMM's log ends:"
      tail -n 3 "$STATE/sandboxes/t$i/vmm.log" | sed 's/^/      /'
      ok=0
    }
  done
  [ "$(command ember ls | grep -cE '^t[0-9]+ +Running')" = 20 ] || { echo "    ls:"; command ember ls; ok=0; }
  echo "restore from template to agent-ready, one at a time: median $(median <restore.ms) ms of 5" \
    "($(tr '\n' ' ' <restore.ms)ms; harness time)" >>$FIGURES
  cat batch.ms >>$FIGURES
  # rm_sb keeps the logs, where the runner looks for a guest's triple fault.
  rm_sb $all
  [ -z "$(ls -A "$STATE/sandboxes")" ] || { echo "    left: $(ls -A "$STATE/sandboxes")"; ok=0; }
  [ $ok = 1 ]
}

case_two_restores_of_one_template_draw_different_random_numbers() {
  command ember run --detach --template t1 --name r1 >/dev/null 2>err &&
    command ember run --detach --template t1 --name r2 >/dev/null 2>>err || { echo "    did not start"; return 1; }
  ok=1
  u1=$(in_sb r1 sh -c 'head -c 32 /dev/urandom | od -An -tx1')
  u2=$(in_sb r2 sh -c 'head -c 32 /dev/urandom | od -An -tx1')
  [ -n "$u1" ] && [ "$u1" != "$u2" ] || { echo "    /dev/urandom gave both: $u1"; ok=0; }
  draw='import os, random; print(random.getrandbits(64), os.urandom(16).hex())'
  p1=$(in_sb r1 python3 -c "$draw")
  p2=$(in_sb r2 python3 -c "$draw")
  [ -n "$p1" ] && [ "${p1% *}" != "${p2% *}" ] && [ "${p1#* }" != "${p2#* }" ] ||
    { echo "    Python drew '$p1' in r1 and '$p2' in r2"; ok=0; }
  command ember rm r1 r2
  [ $ok = 1 ]
}

case_the_clocks_of_a_restore_are_the_hosts_and_in_step() {
  created=$(sed -n 's/.*"created": *\([0-9]*\).*/\1/p' "$STATE/templates/t1/template.json")
  age=$(($(date +%s) - created))
  [ "$age" -ge 5 ] || sleep $((5 - age))
  command ember run --detach --template t1 --name c1 >/dev/null 2>err || { echo "    did not start"; return 1; }
  guest=$(in_sb c1 date +%s)
  host=$(date +%s)
  # The guest's TSC and kvmclock resumed together: its clocksource watchdog (every half
  # second) still trusts the TSC.
  sleep 1
  unstable=$(in_sb c1 dmesg | grep -c "Marking clocksource 'tsc' as unstable")
  command ember rm c1
  echo "    template made at $created, guest says $guest, host $host"
  d=$((host - guest))
  [ "$unstable" = 0 ] || echo "    the restored guest found its TSC out of step with kvmclock"
  [ -n "$guest" ] && [ "${d#-}" -le 2 ] && [ "$unstable" = 0 ]
}

# spare_dirs: the spare VMMs' directories (ready or starting).
spare_dirs() { ls "$STATE/spares" 2>/dev/null | grep -v '^\.'; }
# spare_pid: the pid of the one spare VMM, once its API socket is up.
spare_pid() {
  for _ in $(seq 100); do
    d=$(spare_dirs)
    [ "$(echo "$d" | wc -w)" = 1 ] && [ -S "$STATE/spares/$d/api.sock" ] && { cat "$STATE/spares/$d/pid"; return 0; }
    sleep 0.1
  done
  echo "    spares: $(spare_dirs)" >&2
  return 1
}
sandbox_pid() { sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' "$STATE/sandboxes/$1/sandbox.json"; }

case_a_start_takes_over_a_spare_vmm_and_leaves_another() {
  ok=1
  command ember run --detach --template t1 --name s1 >/dev/null 2>err || { echo "    s1 did not start"; return 1; }
  spare=$(spare_pid) || return 1
  command ember run --detach --template t1 --name s2 >/dev/null 2>err || { echo "    s2 did not start"; return 1; }
  [ "$(sandbox_pid s2)" = "$spare" ] || { echo "    s2 runs on VMM $(sandbox_pid s2), not the spare $spare"; ok=0; }
  [ "$(in_sb s2 hostname)" = s2 ] || { echo "    s2 does not answer as itself"; ok=0; }
  next=$(spare_pid) || return 1
  [ "$next" != "$spare" ] || { echo "    no new spare after s2 took $spare"; ok=0; }
  # A spare that died is passed over and cleared away.
  kill -9 "$next"
  command ember run --detach --template t1 --name s3 >/dev/null 2>err || { echo "    s3 did not start"; cat err; ok=0; }
  [ "$(sandbox_pid s3)" != "$next" ] || { echo "    s3 is recorded with the dead spare's pid"; ok=0; }
  [ "$(in_sb s3 hostname)" = s3 ] || { echo "    s3 does not answer as itself"; ok=0; }
  last=$(spare_pid) || return 1
  # Removing a sandbox whose VMM was a spare stops that VMM.
  command ember rm s2
  st=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' /proc/$spare/status 2>/dev/null)
  [ -z "$st" ] || [ "$st" = Z ] || { echo "    s2's VMM $spare outlived ember rm (state $st)"; ok=0; }
  # No spares wanted: the one left is stopped.
  EMBER_SPARE_VMMS=0 command ember run --detach --template t1 --name s4 >/dev/null 2>err || { echo "    s4 did not start"; ok=0; }
  [ "$(sandbox_pid s4)" = "$last" ] || { echo "    s4 did not take the last spare"; ok=0; }
  [ -z "$(spare_dirs)" ] || { echo "    spares left with EMBER_SPARE_VMMS=0: $(spare_dirs)"; ok=0; }
  [ -z "$(command ember ls | sed 1d | grep -v '^s[134] ')" ] || { echo "    ls shows more: $(command ember ls)"; ok=0; }
  command ember rm s1 s3 s4
  [ $ok = 1 ]
}

case_template_rm_and_bad_templates_fail_clearly() {
  ok=1
  command ember run --detach --template t1 --name u1 >/dev/null 2>err || { echo "    u1 did not start"; return 1; }
  ember template rm t1 2>rm1
  expect_status 1 && expect_in rm1 "template t1 is in use by sandbox u1" || ok=0
  command ember rm u1
  ember template rm t1 2>rm2
  expect_status 0 || { cat rm2; ok=0; }
  [ ! -e "$STATE/templates/t1" ] || { echo "    $STATE/templates/t1 is still there"; ok=0; }
  command ember template ls | grep -q '^t1 ' && { echo "    ls still lists t1"; ok=0; }
  ember run --detach --template t1 --name u2 >/dev/null 2>run1
  expect_status 1 && expect_in run1 "there is no template named t1" || ok=0
  [ ! -e "$STATE/sandboxes/u2" ] || { echo "    the failed start left u2"; ok=0; }
  ember template rm t1 2>rm3
  expect_status 1 && expect_in rm3 "there is no template named t1" || ok=0
  ember template create ../up 2>bad0
  expect_status 1 && expect_in bad0 "'../up' is not a valid name" || ok=0
  ember template create bad --image /no/such/image.ext4 2>bad1
  expect_status 1 && expect_in bad1 "/no/such/image.ext4" || ok=0
  [ ! -e "$STATE/templates/bad" ] || { echo "    a missing image left a template"; ok=0; }
  # An image with no file system: the guest kernel cannot mount its root and panics.
  dd if=/dev/zero of=zeros.img bs=1M count=64 2>/dev/null
  ember template create bad --image "$PWD/zeros.img" --ready-timeout 60 2>bad2
  expect_status 1 && expect_in bad2 "exited during start-up" || ok=0
  [ ! -e "$STATE/templates/bad" ] || { echo "    an unbootable image left a template"; ok=0; }
  nothing_hidden_left || ok=0
  [ -z "$(command ember ls | sed 1d)" ] || { echo "    sandboxes left: $(command ember ls)"; ok=0; }
  [ $ok = 1 ]
}

case_run_detach_makes_an_automatic_template_once_and_restores_from_it() {
  export EMBER_STATE="$PWD/st"
  STATE=$EMBER_STATE
  ok=1
  t0=$(ms)
  ember run --detach --name a1 >/dev/null 2>err1 || { echo "    a1 did not start"; cat err1; return 1; }
  first=$(($(ms) - t0))
  t0=$(ms)
  ember run --detach --name a2 >/dev/null 2>err2 || { echo "    a2 did not start"; cat err2; ok=0; }
  second=$(($(ms) - t0))
  expect_in err1 "ember: making template auto-" || ok=0
  grep -q "making template" err2 && { echo "    the second run made a template again"; ok=0; }
  auto=$(command ember template ls | sed -n 's/^\(auto-[0-9a-f]\{16\}\) .*/\1/p')
  [ "$(echo "$auto" | wc -w)" = 1 ] || { echo "    templates: $(command ember template ls)"; ok=0; }
  # Both are restored from it, on the image it was made from.
  command ember ls --json >ls.json
  [ "$(grep -c "\"snapshot\": \"$STATE/templates/$auto\"" ls.json)" = 2 ] &&
    [ "$(grep -c '"image": "/opt/ember/images/default.ext4"' ls.json)" = 2 ] || { cat ls.json; ok=0; }
  for sb in a1 a2; do
    [ "$(in_sb $sb hostname)" = $sb ] || { echo "    $sb: hostname $(in_sb $sb hostname)"; ok=0; }
  done
  ember run --detach --cold --name c1 >/dev/null 2>err3 || { echo "    c1 did not start"; ok=0; }
  ! grep -q '"origin"' "$STATE/sandboxes/c1/sandbox.json" || { echo "    c1 was not booted"; ok=0; }
  [ "$(in_sb c1 hostname)" = c1 ] || { echo "    c1: hostname $(in_sb c1 hostname)"; ok=0; }
  # Two at once with settings never seen: one template, both sandboxes restored from it.
  for sb in k1 k2; do
    (command ember run --detach --mem-mib 320 --name $sb >/dev/null 2>err.$sb || echo $sb >>failed) &
  done
  wait
  if [ -s failed ]; then
    ok=0
    for t in $(cat failed); do echo "    $t did not start:"; sed 's/^/      /' "err.${t#t}"; done
  fi
  [ "$(command ember template ls | grep -c '^auto-')" = 2 ] || { echo "    templates: $(command ember template ls)"; ok=0; }
  for sb in k1 k2; do
    kib=$(in_sb $sb sed -n 's/^MemTotal: *\([0-9]*\).*/\1/p' /proc/meminfo)
    [ "${kib:-0}" -gt 262144 ] || { echo "    $sb has $kib KiB of memory, not 320 MiB"; ok=0; }
  done
  nothing_hidden_left || ok=0
  echo "run --detach, first (makes the automatic template): $first ms; second (restores): $second ms" >>$FIGURES
  command ember rm a1 a2 c1 k1 k2
  [ $ok = 1 ]
}

run_cases "$0"
result=$?
[ ! -f $FIGURES ] || sed 's/^/figure: /' $FIGURES
exit $result
