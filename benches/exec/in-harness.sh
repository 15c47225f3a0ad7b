# Exec benchmark, run inside the nested harness by benches/exec/run (busybox sh). Two sandboxes
# boot the same way; one runs nothing, the other N execs of `true` and a 100 MiB output stream.
# The difference in VM exits (ember run --stats) is what the execs cost; times are the harness's.
N=${BENCH_EXECS:-50}
uptime_cs() { tr -d . </proc/uptime | cut -d' ' -f1; }

# sandbox WORK EXECS: boots, runs EXECS `true` execs and (if EXECS > 0) the stream, stops,
# and leaves ember's --stats in WORK/vm.err.
sandbox() {
  work=$1 n=$2
  mkdir -p "$work" && cd "$work" || exit 1
  ember disk create --base "$EMBER_HOME/images/default.ext4" s.qcow2 >/dev/null
  dd if=/dev/zero of=job.img bs=4096 count=1 2>/dev/null
  printf '%s\n' 'while [ ! -e /tmp/stop ]; do sleep 0.2; done' | dd of=job.img conv=notrunc 2>/dev/null
  ember run --mem-mib 512 --drive path=s.qcow2,root=on --drive path=job.img,ro=on --stats \
    --vsock "cid=3,uds=$work/v.sock" --cmdline "init=/sbin/ember-init ember_job=/dev/vdb" >vm.out 2>vm.err &
  vm=$!
  until ember exec --uds "$work/v.sock" -- true 2>/dev/null; do sleep 0.5; done
  if [ "$n" -gt 0 ]; then
    t0=$(uptime_cs)
    i=0
    while [ $i -lt "$n" ]; do ember exec --uds "$work/v.sock" -- true; i=$((i + 1)); done
    t1=$(uptime_cs)
    echo "exec of true: $n in $(((t1 - t0) * 10)) ms, $(((t1 - t0) * 10 / n)) ms each (harness time)"
    t0=$(uptime_cs)
    bytes=$(ember exec --uds "$work/v.sock" -- head -c 104857600 /dev/zero | wc -c)
    t1=$(uptime_cs)
    echo "output stream: $bytes bytes in $(((t1 - t0) * 10)) ms"
    ember exec --uds "$work/v.sock" -- sh -c 'grep VmRSS /proc/$(pidof ember-agent)/status' |
      sed 's/^/agent resident memory in the guest, idle: /'
  fi
  ember exec --uds "$work/v.sock" -- touch /tmp/stop
  wait $vm
  cd /
}

exits() { sed -n 's/^ember stats: vm exits: //p' "$1/vm.err"; }
sandbox /tmp/idle 0
sandbox /tmp/busy "$N"
idle=$(exits /tmp/idle)
busy=$(exits /tmp/busy)
echo "VM exits, boot + stop alone: $idle; with $N execs + 100 MiB streamed: $busy"
echo "VM exits attributable to the execs and the stream: $((busy - idle))"
echo "--- exits by reason, busy sandbox:"
grep "ember stats:  " /tmp/busy/vm.err
