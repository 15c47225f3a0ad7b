# End-to-end crash-consistency test of copy-on-write overlays, run inside the nested harness
# by tests/e2e/run (busybox sh). A suite of its own: killing a VMM mid-run is what has, now and
# then, hung the nested harness's VM teardown (see shared/ENVIRONMENT.md), and tests/e2e/run
# retries a suite whose harness failed.
. /opt/ember/extra/lib.sh
case_sigkill_during_heavy_writes_leaves_a_clean_filesystem() {
  ember disk create --base $IMAGES/default.ext4 victim.qcow2 >>out 2>>err || return 1
  mkjob writer.img "i=0; while :; do dd if=/dev/urandom of=/junk.\$i bs=64k count=16 2>/dev/null; sync; i=\$((i+1)); echo wrote \$i; done"
  command ember run --mem-mib 512 --drive path=victim.qcow2,root=on --drive path=writer.img,ro=on \
    --cmdline "init=/sbin/ember-init ember_job=/dev/vdb" >victim.out 2>&1 &
  pid=$!
  # Kill once the guest has written a few files, mid-stream.
  n=0
  while [ $n -lt 120 ] && ! grep -q "wrote 3" victim.out; do sleep 1; n=$((n + 1)); done
  kill -9 $pid
  wait $pid 2>/dev/null
  grep -q "wrote 3" victim.out || { echo "    the writer never got going"; tail -5 victim.out; return 1; }
  ember disk create --base $IMAGES/default.ext4 checker.qcow2 >>out 2>>err || return 1
  # Mounting replays the journal, as a reboot would; then the check must find nothing.
  mkjob check.img "mkdir -p /mnt && mount /dev/vdc /mnt && ls /mnt | grep -c junk && umount /mnt && e2fsck -fn /dev/vdc; echo fsck-status \$?"
  ember run --mem-mib 512 --drive path=checker.qcow2,root=on --drive path=check.img,ro=on \
    --drive path=victim.qcow2 --cmdline "init=/sbin/ember-init ember_job=/dev/vdb" >>out 2>>err
  expect_status 0 && expect_in out "fsck-status 0"
}

run_cases "$0"
