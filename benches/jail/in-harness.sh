# Run by benches/jail/run inside the nested harness (busybox sh).
N=${BENCH_RUNS:-5}
ms() { awk '{printf "%d", $1 * 1000}' /proc/uptime; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR + 1) / 2)]}'; }
# vmm_kib NAME: the anonymous memory (KiB) of sandbox NAME's VMM outside guest RAM (its
# mappings of 256 MiB and more), what the jail could add to.
vmm_kib() {
  pid=$(sed -n 's/.*"pid": *\([0-9]*\).*/\1/p' "$HOME/.local/state/ember/sandboxes/$1/sandbox.json")
  awk '/^[0-9a-f]+-[0-9a-f]+ / {ram = 0} /^Size:/ {ram = ($2 >= 262144)} /^Anonymous:/ && !ram {kib += $2} END {print kib + 0}' \
    "/proc/$pid/smaps"
}
# mode jailed|open: the environment a start of that kind runs in.
env_of() { [ "$1" = open ] && echo "EMBER_JAIL=off" || echo "EMBER_JAIL=on"; }
ember template create bench >/dev/null || exit 1
for mode in jailed open; do : >restore.$mode; : >fork.$mode; : >memory.$mode; done
# Run 0 of each kind is a warm-up (the emulated CPU translates code on its first run).
for i in $(seq 0 "$N"); do
  for mode in jailed open; do
    e=$(env_of $mode)
    # A spare of this kind for the start after the pause, as a user's earlier start leaves.
    env $e ember run --detach --template bench --name pre-$mode-$i >/dev/null || exit 1
    sleep 2
    t0=$(ms)
    env $e ember run --detach --template bench --name r-$mode-$i >/dev/null || exit 1
    [ "$i" = 0 ] || echo $(($(ms) - t0)) >>restore.$mode
    sleep 2
    [ "$i" = 0 ] || vmm_kib r-$mode-$i >>memory.$mode
    t0=$(ms)
    env $e ember fork r-$mode-$i >/dev/null || exit 1
    [ "$i" = 0 ] || echo $(($(ms) - t0)) >>fork.$mode
    ember rm pre-$mode-$i r-$mode-$i r-$mode-$i-1 >/dev/null
  done
done
echo "Debian sandbox, 256 MiB, $N runs each, medians (harness time), jailed | not jailed | ratio (target <= 1.05)"
for what in restore fork; do
  j=$(median <$what.jailed) o=$(median <$what.open)
  echo "$what to agent-ready: $j ms | $o ms | $(awk "BEGIN{printf \"%.2f\", $j / $o}")"
  echo "  each jailed: $(tr '\n' ' ' <$what.jailed)ms; each not: $(tr '\n' ' ' <$what.open)ms"
done
j=$(median <memory.jailed) o=$(median <memory.open)
echo "idle restored VMM, anonymous memory outside guest RAM: $j KiB | $o KiB | +$((j - o)) KiB (target <= +16)"
echo "  each jailed: $(tr '\n' ' ' <memory.jailed)KiB; each not: $(tr '\n' ' ' <memory.open)KiB"
ember template rm bench
