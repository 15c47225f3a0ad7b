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
for i in $(seq "$N"); do
  t0=$(ms)
  ember run --detach --name cold$i --mem-mib "$MEM" >/dev/null || exit 1
  echo $(($(ms) - t0)) >>cold.ms
  [ "$i" = "$N" ] || ember rm cold$i
done
t0=$(ms)
ember snapshot cold$N /tmp/snap >/dev/null || exit 1
snap_ms=$(($(ms) - t0))
ember rm cold$N

: >restore.ms
: >vmm.ms
for i in $(seq "$N"); do
  t0=$(ms)
  EMBER_LOG=info ember run --detach --from-snapshot /tmp/snap --name warm$i >/dev/null || exit 1
  echo $(($(ms) - t0)) >>restore.ms
  sed -n 's/.*first KVM_RUN \([0-9.]*\)\(µs\|ms\) after.*/\1 \2/p' "$STATE/warm$i/vmm.log" |
    awk '{printf "%.3f\n", $2 == "ms" ? $1 : $1 / 1000}' >>vmm.ms
done
pid=$(pid_of warm1)
# Guest pages faulted in: the resident part of the memory file's private mapping.
before=$(awk '/\/tmp\/snap\/memory/ {m=1; next} /^[0-9a-f]+-/ {m=0} m && $1 == "Rss:" {s += $2} END {print s + 0}' /proc/$pid/smaps)
ember exec warm1 -- true </dev/null
after=$(awk '/\/tmp\/snap\/memory/ {m=1; next} /^[0-9a-f]+-/ {m=0} m && $1 == "Rss:" {s += $2} END {print s + 0}' /proc/$pid/smaps)
sleep 2
pss=$(kib Pss $pid)
uss=$(($(kib Private_Clean $pid) + $(kib Private_Dirty $pid)))

cold=$(median <cold.ms)
warm=$(median <restore.ms)
echo "guest: $MEM MiB Debian sandbox, $N runs each, medians (harness time)"
echo "cold boot to agent-ready:            $cold ms"
echo "restore from snapshot to agent-ready: $warm ms ($(awk "BEGIN{printf \"%.1f\", $cold / $warm}")x faster)"
echo "snapshot of a running sandbox:        $snap_ms ms (memory file $(du -k /tmp/snap/memory | cut -f1) KiB on disk)"
echo "VMM: load request to first KVM_RUN:   $(median <vmm.ms) ms"
echo "guest memory faulted in by a restored sandbox: $before KiB up to agent-ready, $after KiB after one exec"
echo "idle restored sandbox's VMM process: PSS $pss KiB, USS $uss KiB"
for i in $(seq "$N"); do ember rm warm$i; done
