# End-to-end tests of the security boundary around sandboxes, run inside the nested harness by
# tests/e2e/run (busybox sh, as root): every VMM the control plane starts is jailed (its own
# namespaces and root, an unprivileged uid, no capabilities, seccomp on every thread) and in a
# cgroup of its own; another local user reaches nothing of a sandbox whatever the umask. The
# cases share one sandbox, started by the first and removed by the last.
. /opt/ember/extra/lib.sh
SB=sec-sb
STATE=$HOME/.local/state/ember
EXTRA_LOGS="$STATE/sandboxes/$SB/vmm.log $STATE/sandboxes/$SB/console.log"

# record_field NAME FIELD: a string or number field of sandbox NAME's record.
record_field() {
  sed -n "s/^ *\"$2\": *\"\{0,1\}\([^\",]*\)\"\{0,1\},\{0,1\}$/\1/p" "$STATE/sandboxes/$1/sandbox.json"
}

case_a_sandboxs_vmm_is_jailed_unprivileged_and_filtered() {
  umask 000
  ember run --detach --name $SB --mem-mib 512 >/dev/null 2>err
  expect_status 0 || return 1
  pid=$(record_field $SB pid)
  [ -n "$pid" ] && [ -d /proc/$pid ] || { echo "    no VMM process recorded"; return 1; }
  for t in /proc/$pid/task/*; do
    grep -q "^Seccomp:[[:space:]]*2" $t/status && grep -q "^NoNewPrivs:[[:space:]]*1" $t/status || {
      echo "    thread $(cat $t/comm) is not confined:"; grep -E "Seccomp|NoNewPrivs" $t/status; return 1; }
  done
  grep -q "^Uid:[[:space:]]*60000[[:space:]]" /proc/$pid/status || { echo "    not the jail uid:"; grep Uid /proc/$pid/status; return 1; }
  grep -q "^CapEff:[[:space:]]*0000000000000000" /proc/$pid/status || { grep Cap /proc/$pid/status; return 1; }
  grep -q "^CapBnd:[[:space:]]*0000000000000000" /proc/$pid/status || { grep Cap /proc/$pid/status; return 1; }
  # Pid 1 of its own pid namespace, in network, mount, ipc and uts namespaces of its own.
  grep -q "^NSpid:[[:space:]]*$pid[[:space:]]*1$" /proc/$pid/status || { grep NSpid /proc/$pid/status; return 1; }
  for ns in net mnt ipc uts pid; do
    [ "$(readlink /proc/$pid/ns/$ns)" != "$(readlink /proc/self/ns/$ns)" ] || { echo "    shares the host's $ns namespace"; return 1; }
  done
  # Its root holds what it needs: no host directory it was not given.
  ls /proc/$pid/root >root.ls
  for unwanted in bin etc sbin tmp usr sys; do
    ! grep -qx "$unwanted" root.ls || { echo "    its root holds /$unwanted:"; cat root.ls; return 1; }
  done
  [ "$(ls /proc/$pid/root/proc | grep -c '^[0-9]')" = 1 ] || { echo "    it sees other processes:"; ls /proc/$pid/root/proc; return 1; }
  [ ! -e /proc/$pid/root/etc/passwd ] || { echo "    it sees /etc/passwd"; return 1; }
  # Everything still works from the host's side.
  in_sb $SB sh -c 'echo jailed' >out
  expect_in out jailed
}

case_another_local_user_reaches_nothing_even_under_umask_000() {
  grep -q '^intruder:' /etc/passwd || echo 'intruder:x:1234:1234::/tmp:/bin/sh' >>/etc/passwd
  [ "$(stat -c %a "$STATE")" = 700 ] || { echo "    $STATE is $(stat -c %a "$STATE")"; return 1; }
  for f in "$STATE"/templates/*/memory "$STATE"/templates/*/state "$STATE/sandboxes/$SB/disk.qcow2"; do
    mode=$(stat -c %a "$f")
    case $mode in 600|640) ;; *) echo "    $f is mode $mode"; return 1 ;; esac
  done
  send=/opt/ember/extra/uds-send
  for sock in api.sock vsock.sock; do
    printf 'GET / HTTP/1.1\r\n\r\n' | su intruder -c "$send $STATE/sandboxes/$SB/$sock" >as-intruder 2>&1
    grep -q "Permission denied" as-intruder || { echo "    the other user reached $sock:"; cat as-intruder; return 1; }
  done
  su intruder -c "ls $STATE/sandboxes" >as-intruder 2>&1
  grep -q "Permission denied" as-intruder || { echo "    the other user listed the sandboxes:"; cat as-intruder; return 1; }
  su intruder -c "cat $STATE/templates/*/memory" >/dev/null 2>as-intruder
  grep -q "Permission denied" as-intruder || { echo "    the other user read a template's memory"; cat as-intruder; return 1; }
  HOME=/tmp su intruder -c "EMBER_STATE=$STATE ember ls" >as-intruder 2>&1
  ! grep -q $SB as-intruder || { echo "    the other user's ember ls shows the sandbox:"; cat as-intruder; return 1; }
}

case_a_vmm_past_its_memory_limit_is_killed_alone() {
  cgroup=$(record_field $SB cgroup)
  [ -n "$cgroup" ] && [ -f "$cgroup/memory.max" ] || { echo "    the sandbox has no cgroup: '$cgroup'"; return 1; }
  [ "$(cat "$cgroup/pids.max")" != max ] || { echo "    no pids.max"; return 1; }
  ember run --detach --name $SB-other >/dev/null 2>>err || return 1
  # Lower the limit below what the guest is about to use, and have it use it.
  current=$(cat "$cgroup/memory.current")
  echo $((current + (32 << 20))) >"$cgroup/memory.max"
  in_sb $SB python3 -c 'b = bytearray(300 << 20); print(len(b))' >out 2>&1
  n=0
  while [ -d /proc/$(record_field $SB pid) ] && [ $n -lt 30 ]; do sleep 1; n=$((n + 1)); done
  grep -q "^oom_kill [1-9]" "$cgroup/memory.events" || { echo "    no OOM kill in its cgroup:"; cat "$cgroup/memory.events"; return 1; }
  ember ls >ls 2>&1
  grep -E "^$SB +Stopped" ls >/dev/null || { echo "    ls says:"; cat ls; return 1; }
  in_sb $SB-other sh -c 'echo still here' >out2
  expect_in out2 "still here" || return 1
  rm_sb $SB $SB-other
  [ ! -d "$cgroup" ] || { echo "    its cgroup $cgroup is left behind"; return 1; }
  [ -z "$(ls "$STATE/jails" 2>/dev/null | grep -v '^spare-')" ] || { echo "    jails left behind:"; ls "$STATE/jails"; return 1; }
}

case_a_user_who_is_not_root_gets_a_vmm_jailed_in_a_user_namespace() {
  # A host where KVM is a group's, and a member of it who is not root.
  grep -q '^kvm:' /etc/group || echo 'kvm:x:2001:sbuser' >>/etc/group
  grep -q '^sbuser:' /etc/passwd || echo 'sbuser:x:2000:2000::/home/sbuser:/bin/sh' >>/etc/passwd
  mkdir -p /home/sbuser && chown 2000:2000 /home/sbuser
  chgrp 2001 /dev/kvm && chmod 660 /dev/kvm
  su sbuser -c "ember run --detach --name mine" >out 2>err
  status=$?
  ustate=/home/sbuser/.local/state/ember/sandboxes
  pid=$(sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' "$ustate/mine/sandbox.json" 2>/dev/null)
  report() { echo "    $1"; grep -E "Uid|Cap|Seccomp|NoNewPrivs|NSpid" /proc/$pid/status 2>/dev/null; tail -5 "$ustate/mine/vmm.log"; }
  check() {
    [ $status = 0 ] || { echo "    ember run as sbuser failed:"; cat err; return 1; }
    expect_in err "jailed in user namespaces" || return 1
    grep -q "^Uid:[[:space:]]*2000[[:space:]]" /proc/$pid/status || { report "not the caller's uid"; return 1; }
    for t in /proc/$pid/task/*; do
      grep -q "^Seccomp:[[:space:]]*2" $t/status && grep -q "^NoNewPrivs:[[:space:]]*1" $t/status ||
        { report "thread $(cat $t/comm) is not confined"; return 1; }
    done
    grep -q "^CapEff:[[:space:]]*0000000000000000" /proc/$pid/status && grep -q "^CapBnd:[[:space:]]*0000000000000000" /proc/$pid/status ||
      { report "capabilities left"; return 1; }
    grep -q "^NSpid:[[:space:]]*$pid[[:space:]]*1$" /proc/$pid/status || { report "not pid 1 of its own pid namespace"; return 1; }
    for ns in user net mnt ipc uts pid; do
      [ "$(readlink /proc/$pid/ns/$ns)" != "$(readlink /proc/self/ns/$ns)" ] || { report "shares the host's $ns namespace"; return 1; }
    done
    ls /proc/$pid/root >root.ls
    for unwanted in bin etc sbin tmp usr sys; do
      ! grep -qx "$unwanted" root.ls || { echo "    its root holds /$unwanted:"; cat root.ls; return 1; }
    done
    su sbuser -c "ember exec mine -- sh -c 'echo from \$(id -u)'" </dev/null >out 2>&1
    expect_in out "from 0" || return 1
    # What the guest does stays the caller's: the sandbox's files are sbuser's alone.
    [ "$(stat -c %U "$ustate/mine/disk.qcow2")" = sbuser ] || { ls -l "$ustate/mine"; return 1; }
    # Forks work jailed so (the frozen memory travels as descriptors).
    su sbuser -c "ember fork mine" >out 2>&1 && expect_in out mine-1 || { cat out; return 1; }
    su sbuser -c "ember exec mine-1 -- echo child" </dev/null >out 2>&1
    expect_in out child || return 1
    su sbuser -c "ember rm mine mine-1" 2>&1 && [ ! -e "$ustate/mine" ] && [ ! -e "$ustate/mine-1" ]
  }
  check
  result=$?
  su sbuser -c "ember rm mine mine-1" >/dev/null 2>&1
  chmod 600 /dev/kvm && chgrp 0 /dev/kvm
  return $result
}

run_cases "$0"
