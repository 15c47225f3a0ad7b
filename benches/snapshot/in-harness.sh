# Run by benches/snapshot/run inside the nested harness (busybox sh).
N=${BENCH_RESTORES:-5}
MEM=${BENCH_MEM_MIB:-256}
STATE=$HOME/.local/state/ember/sandboxes
ms() { awk '{printf "%d", $1 * 1000}' /proc/uptime; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}'; }
# kib FIELD PID: a field of the VMM's smaps_rollup, in KiB.
kib() { awk -v f="$1:" '$1 == f {print $2}' "/proc/$2/smaps_rollup"; }
pid_of() { sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' "$STATE/$1/sandbox.json"; }

: >cold.ms
: >cold.exits
# exits SANDBOX: its VM exits so far.
exits() { ember stats "$1" | sed -n 's/^vm exits: //p'; }
# Each start is timed after a second's pause, in which the spare VMM the start before left
# behind gets ready, as it does between the starts of a user or an agent that uses its sandbox.
# Start 0 of each kind is a warm-up, not counted (the emulated CPU of the harness translates
# the code a first run executes, and later runs reuse it).
for i in $(seq 0 "$N"); do
  sleep 1
  t0=$(ms)
  ember run --detach --cold --name cold$i --mem-mib "$MEM" >/dev/null || exit 1
  [ "$i" = 0 ] || echo $(($(ms) - t0)) >>cold.ms
  [ "$i" = 0 ] || exits cold$i >>cold.exits
  [ "$i" = "$N" ] || ember rm cold$i
done
t0=$(ms)
ember snapshot cold$N /tmp/snap >/dev/null || exit 1
snap_ms=$(($(ms) - t0))
ember rm cold$N

: >restore.ms
: >restore.exits
: >vmm.ms
# Restores from a template (a snapshot of a freshly booted sandbox), as `ember run --detach`
# does by default; the spare VMM a start takes over was started by the start before. Each is
# removed once measured, as each cold boot is: idle guests take the harness's CPU.
ember template create bench --mem-mib "$MEM" >/dev/null || exit 1
for i in $(seq 0 "$N"); do
  sleep 1
  t0=$(ms)
  EMBER_LOG=info ember run --detach --template bench --name warm$i >/dev/null || exit 1
  [ "$i" != 0 ] || { ember rm warm0; continue; }
  echo $(($(ms) - t0)) >>restore.ms
  exits warm$i >>restore.exits
  sed -n 's/.*first KVM_RUN \([0-9.]*\)\(µs\|ms\) after.*/\1 \2/p' "$STATE/warm$i/vmm.log" |
    awk '{printf "%.3f\n", $2 == "ms" ? $1 : $1 / 1000}' >>vmm.ms
  [ "$i" = "$N" ] || ember rm warm$i
done
pid=$(pid_of warm$N)
# Guest pages faulted in: the resident part of the memory file's private mapping.
before=$(awk '/\/templates\/bench\/memory/ {m=1; next} /^[0-9a-f]+-/ {m=0} m && $1 == "Rss:" {s += $2} END {print s + 0}' /proc/$pid/smaps)
ember exec warm$N -- true </dev/null
after=$(awk '/\/templates\/bench\/memory/ {m=1; next} /^[0-9a-f]+-/ {m=0} m && $1 == "Rss:" {s += $2} END {print s + 0}' /proc/$pid/smaps)
sleep 2
pss=$(kib Pss $pid)
uss=$(($(kib Private_Clean $pid) + $(kib Private_Dirty $pid)))

cold=$(median <cold.ms)
warm=$(median <restore.ms)
echo "guest: $MEM MiB Debian sandbox, $N runs each, medians (harness time)"
echo "cold boot to agent-ready:            $cold ms, $(median <cold.exits) VM exits"
echo "restore from template to agent-ready: $warm ms ($(awk "BEGIN{printf \"%.1f\", $cold / $warm}")x faster), $(median <restore.exits) VM exits"
echo "  each cold boot: $(tr '\n' ' ' <cold.ms)ms; each restore: $(tr '\n' ' ' <restore.ms)ms"
echo "snapshot of a running sandbox:        $snap_ms ms (memory file $(du -k /tmp/snap/memory | cut -f1) KiB on disk)"
echo "VMM: load request to first KVM_RUN:   $(median <vmm.ms) ms"
echo "guest memory faulted in by a restored sandbox: $before KiB up to agent-ready, $after KiB after one exec"
echo "idle restored sandbox's VMM process: PSS $pss KiB, USS $uss KiB"
ember rm warm$N
ember template rm bench

# Forks of a running sandbox, 256 MiB and 2 GiB guests: the time `ember fork` takes to a
# child whose agent answers, the part of it the parent is paused for, and the VMM's own freeze
# (state file + memory frozen in place); then the idle child's unique memory. The parent boots
# cold, so its first fork freezes its memfd in place and later ones freeze the pages it wrote
# since into a layer. The first fork comes right after the boot; the others after the parent
# has run for 10 s, as a sandbox a user forks has. Both children's memory is reported: a guest
# forked in its first seconds hands the kernel work its boot left for later to every child.
# guest_anon_kib PID: anonymous memory in a VMM's guest RAM mappings (memfd, layers, a
# snapshot's memory file): the guest pages it dirtied.
guest_anon_kib() {
  awk '/^[0-9a-f]+-/ {m = /ember-guest-ram|\/memory$/} m && $1 == "Anonymous:" {s += $2} END {print s + 0}' "/proc/$1/smaps"
}
for mem in 256 2048; do
  EMBER_LOG=info ember run --detach --cold --name f$mem --mem-mib $mem >/dev/null || exit 1
  : >fork$mem.ms
  : >pause$mem.ms
  for i in $(seq "$N"); do
    [ "$i" = 2 ] && sleep 10
    t0=$(ms)
    EMBER_LOG=debug ember fork f$mem 2>fork.err >/dev/null || { cat fork.err; exit 1; }
    echo $(($(ms) - t0)) >>fork$mem.ms
    [ "$i" = 1 ] && cp fork$mem.ms fork$mem.first
    sed -n 's/.*frozen and resumed after \([0-9.]*\)\(µs\|ms\|s\)$/\1 \2/p' fork.err |
      awk '{printf "%.1f\n", $2 == "s" ? $1 * 1000 : $2 == "ms" ? $1 : $1 / 1000}' >>pause$mem.ms
    # f$mem-1, the child of the just-booted parent, stays; the later ones are each f$mem-2.
    [ "$i" = 1 ] || [ "$i" = "$N" ] || ember rm f$mem-2
  done
  sleep 2
  early=$(guest_anon_kib "$(pid_of f$mem-2)")
  # The same idle time for both children: a young child's kernel work can come seconds later.
  sleep 13
  echo "fork of a running $mem MiB sandbox (median of $N): $(median <fork$mem.ms) ms to the child's agent answering" \
    "(the first, memory frozen in place: $(cat fork$mem.first) ms), parent paused $(median <pause$mem.ms) ms"
  sed -n 's/.*state written and memory frozen in \(.*\)$/\1/p' "$STATE/f$mem/vmm.log" |
    awk 'NR == 1 {f = $1} {l = $1} END {print "  VMM freeze (state file + memory): first fork " f ", last " l}' 
  for child in f$mem-2 f$mem-1; do
    cpid=$(pid_of $child)
    anon=$(kib Anonymous $cpid)
    guest=$(guest_anon_kib $cpid)
    [ $child = f$mem-2 ] && of="a parent that had run 10 s, 15 s after the fork (guest pages 2 s after it: $early KiB)" ||
      of="the just-booted parent, some 20 s after the fork"
    echo "  idle child of $of: unique memory $anon KiB = guest pages it dirtied $guest KiB + VMM process" \
      "$((anon - guest)) KiB (anonymous); USS $(($(kib Private_Clean $cpid) + $(kib Private_Dirty $cpid))) KiB, PSS $(kib Pss $cpid) KiB"
  done
  median <fork$mem.ms >fork$mem.median
  ember rm f$mem f$mem-1 f$mem-2
done
echo "fork time 2 GiB / 256 MiB: $(awk "BEGIN{printf \"%.2f\", $(cat fork2048.median) / $(cat fork256.median)}") (target <= 2)"
