# Boot benchmark, run inside the nested harness by benches/boot/run (busybox sh).
# ember with the host's shared memory given no huge pages (shmem_enabled never, Debian's
# default) and given them on request (advise), interleaved, against the measuring probe of
# ../shared/probes on the same kernel and initramfs; then the figures side by side.
X=/opt/ember/extra
RUNS=${BENCH_RUNS:-3}
THP=/sys/kernel/mm/transparent_hugepage/shmem_enabled
i=1
while [ "$i" -le "$RUNS" ]; do
  for thp in never advise; do
    echo "$thp" >$THP
    echo "== ember run $i (shmem_enabled $thp)"
    ember run --initrd $X/reboot.cpio --stats >/tmp/ember.out 2>/tmp/ember.err
    echo "exit status $?"
    grep "ember stats" /tmp/ember.err
    sed -n "s/^ember stats: start to exit: \([0-9.]*\) ms/\1/p" /tmp/ember.err >>/tmp/boot.$thp
  done
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
echo never >$THP
median() { sort -n "$1" | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
never=$(median /tmp/boot.never)
advise=$(median /tmp/boot.advise)
echo "== minimal boot, start to exit, median of $RUNS"
echo "figure: shmem_enabled never: $never ms; advise (guest RAM in huge pages): $advise ms; advise/never: $(awk "BEGIN {printf \"%.2f\", $advise / $never}")"
