# Boot benchmark, run inside the nested harness by benches/boot/run (busybox sh).
# ember against the measuring probe of ../shared/probes on the same kernel and initramfs.
X=/opt/ember/extra
RUNS=${BENCH_RUNS:-3}
i=1
while [ "$i" -le "$RUNS" ]; do
  echo "== ember run $i"
  ember run --initrd $X/reboot.cpio --stats >/tmp/ember.out 2>/tmp/ember.err
  echo "exit status $?"
  grep "ember stats" /tmp/ember.err
  if [ -x $X/direct-boot-loader ]; then
    echo "== probe run $i"
    # busybox time reports on stderr; the probe prints its exit count there too.
    INITRD=$X/reboot.cpio time $X/direct-boot-loader /opt/ember/vmlinux \
      "console=ttyS0 reboot=k panic=-1 nomodule quiet" >/tmp/probe.out 2>/tmp/probe.err
    echo "exit status $?"
    grep -E "reset after|real" /tmp/probe.err
  fi
  i=$((i + 1))
done
