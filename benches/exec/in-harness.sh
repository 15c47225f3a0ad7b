# Exec benchmark, run inside the nested harness by benches/exec/run (busybox sh). Identical
# sandboxes boot, each does one workload, and stop; the VM exits of a workload are its sandbox's
# exits (ember run --stats) minus those of the sandbox that did nothing. Times are the harness's.
N=${BENCH_EXECS:-50}
MIB=${BENCH_MIB:-100}
uptime_cs() { tr -d . </proc/uptime | cut -d' ' -f1; }
say() { echo "$*" >>/tmp/results; }

# sandbox NAME: boots a sandbox in /tmp/NAME and runs workload_NAME in it; leaves ember's
# --stats in /tmp/NAME/vm.err.
sandbox() {
  work=/tmp/$1
  mkdir -p "$work" && cd "$work" || exit 1
  ember disk create --base "$EMBER_HOME/images/default.ext4" s.qcow2 >/dev/null
  dd if=/dev/zero of=job.img bs=4096 count=1 2>/dev/null
  printf '%s\n' 'while [ ! -e /tmp/stop ]; do sleep 0.2; done' | dd of=job.img conv=notrunc 2>/dev/null
  ember run --mem-mib 512 --drive path=s.qcow2,root=on --drive path=job.img,ro=on --stats \
    --vsock "cid=3,uds=$work/v.sock" --cmdline "init=/sbin/ember-init ember_job=/dev/vdb" >vm.out 2>vm.err &
  vm=$!
  until ember exec --uds "$work/v.sock" -- true </dev/null 2>/dev/null; do sleep 0.5; done
  "workload_$1"
  ember exec --uds "$work/v.sock" -- touch /tmp/stop </dev/null
  wait $vm
  cd /
}

workload_idle() { :; }

workload_true() {
  t0=$(uptime_cs)
  i=0
  while [ $i -lt "$N" ]; do ember exec --uds "$work/v.sock" -- true </dev/null; i=$((i + 1)); done
  t1=$(uptime_cs)
  say "exec of true: $N in $(((t1 - t0) * 10)) ms, $(((t1 - t0) * 10 / N)) ms each (harness time)"
  ember exec --uds "$work/v.sock" -- sh -c 'grep VmRSS /proc/$(pidof ember-agent)/status' </dev/null |
    sed 's/^/agent resident memory in the guest, idle: /' >>/tmp/results
}

workload_stream() {
  t0=$(uptime_cs)
  bytes=$(ember exec --uds "$work/v.sock" -- head -c $((MIB << 20)) /dev/zero </dev/null | wc -c)
  t1=$(uptime_cs)
  say "output stream: $bytes bytes in $(((t1 - t0) * 10)) ms"
}

workload_upload() {
  head -c $((MIB << 20)) /dev/zero >/tmp/payload
  t0=$(uptime_cs)
  ember cp --uds "$work/v.sock" /tmp/payload vm:/tmp/payload
  t1=$(uptime_cs)
  say "upload: $MIB MiB in $(((t1 - t0) * 10)) ms"
}

workload_download() {
  ember exec --uds "$work/v.sock" -- sh -c "head -c $((MIB << 20)) /dev/zero >/tmp/payload" </dev/null
  t0=$(uptime_cs)
  ember cp --uds "$work/v.sock" vm:/tmp/payload /tmp/downloaded
  t1=$(uptime_cs)
  say "download: $(wc -c </tmp/downloaded) bytes in $(((t1 - t0) * 10)) ms"
  rm -f /tmp/downloaded
}

exits() { sed -n 's/^ember stats: vm exits: //p' "/tmp/$1/vm.err"; }
: >/tmp/results
for w in idle true stream upload download; do sandbox $w; done
cat /tmp/results
idle=$(exits idle)
echo "VM exits, boot + stop alone: $idle"
per() { awk "BEGIN{printf \"%.2f\", ($1) / ($2)}"; }
t=$(($(exits true) - idle))
echo "VM exits for $N execs of true: $t, $(per $t $N) per exec (target < 100)"
chunks=$((MIB * 64))
for w in stream upload download; do
  e=$(($(exits $w) - idle))
  echo "VM exits for $MIB MiB of $w: $e, $(per $e $chunks) per 16 KiB (target < 1)"
done
echo "--- exits by reason, the true sandbox:"
grep "ember stats:  " /tmp/true/vm.err
