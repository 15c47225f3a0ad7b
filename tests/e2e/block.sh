# End-to-end tests of virtio-blk and copy-on-write overlays, run inside the nested harness
# by tests/e2e/run (busybox sh). Guests boot the images of rootfs/build from overlays; their
# /sbin/ember-init runs the shell script found on the raw "job" disk named by ember_job=.
. /opt/ember/extra/lib.sh
case_python_runs_in_debian_booted_from_an_overlay() {
  ember disk create --base $IMAGES/default.ext4 top.qcow2 >>out 2>>err || return 1
  mkjob job.img "python3 -c 'print(2**64)'"
  boot path=top.qcow2 job.img
  expect_status 0 && expect_in out "18446744073709551616" && expect_in out "ember-job-exit: 0"
}

case_a_synced_file_survives_into_the_next_boot_and_the_base_is_untouched() {
  before=$(sha256sum $IMAGES/test.ext4 | cut -d' ' -f1)
  ember disk create --base $IMAGES/test.ext4 top.qcow2 >>out 2>>err || return 1
  mkjob job1.img "echo kept-across-boots > /data.txt && sync"
  boot path=top.qcow2 job1.img
  expect_status 0 || return 1
  mkjob job2.img "cat /data.txt"
  boot path=top.qcow2 job2.img
  expect_status 0 && expect_in out "kept-across-boots" || return 1
  after=$(sha256sum $IMAGES/test.ext4 | cut -d' ' -f1)
  [ "$before" = "$after" ] || { echo "    base image changed"; return 1; }
}

case_two_vms_on_one_base_do_not_see_each_others_writes() {
  ember disk create --base $IMAGES/test.ext4 a.qcow2 >>out 2>>err || return 1
  ember disk create --base $IMAGES/test.ext4 b.qcow2 >>out 2>>err || return 1
  mkjob ja.img "echo from-a > /mine.txt; sync; sleep 1; ls /"
  mkjob jb.img "echo from-b > /mine.txt; sync; sleep 1; ls /"
  command ember run --mem-mib 256 --drive path=a.qcow2,root=on --drive path=ja.img,ro=on \
    --cmdline "init=/sbin/ember-init ember_job=/dev/vdb" >a.out 2>&1 &
  pa=$!
  command ember run --mem-mib 256 --drive path=b.qcow2,root=on --drive path=jb.img,ro=on \
    --cmdline "init=/sbin/ember-init ember_job=/dev/vdb" >b.out 2>&1 &
  pb=$!
  wait $pa || { echo "    VM a failed"; cat a.out; return 1; }
  wait $pb || { echo "    VM b failed"; cat b.out; return 1; }
  mkjob check.img "cat /mine.txt"
  boot path=a.qcow2 check.img
  expect_in out "from-a" || return 1
  : >out
  boot path=b.qcow2 check.img
  expect_in out "from-b" && ! grep -q "from-a" out
}

case_a_chained_overlay_sees_the_frozen_layer_which_never_sees_it() {
  ember disk create --base $IMAGES/test.ext4 frozen.qcow2 >>out 2>>err || return 1
  mkjob j1.img "echo in-frozen > /layer1.txt; sync"
  boot path=frozen.qcow2 j1.img
  expect_status 0 || return 1
  ember disk create --base frozen.qcow2 top.qcow2 >>out 2>>err || return 1
  mkjob j2.img "cat /layer1.txt; echo in-top > /layer2.txt; sync"
  boot path=top.qcow2 j2.img
  expect_status 0 && expect_in out "in-frozen" || return 1
  ember disk info top.qcow2 >info 2>&1
  expect_in info "frozen.qcow2" && expect_in info "test.ext4" || return 1
  : >out
  mkjob j3.img "ls /layer2.txt || echo layer2-absent"
  boot path=frozen.qcow2,ro=on j3.img
  expect_in out "layer2-absent"
}

case_read_only_root_refuses_writes() {
  mkjob job.img "touch /x 2>&1 || echo write-refused"
  boot path=$IMAGES/test.ext4,ro=on job.img
  expect_status 0 && expect_in out "write-refused"
}

case_flatten_gives_a_standalone_image_with_the_chain_content() {
  ember disk create --base $IMAGES/test.ext4 top.qcow2 >>out 2>>err || return 1
  mkjob j1.img "echo flattened > /flat.txt; sync"
  boot path=top.qcow2 j1.img
  ember disk flatten top.qcow2 flat.img >>out 2>>err || return 1
  mkjob j2.img "cat /flat.txt"
  boot path=flat.img j2.img
  expect_status 0 && expect_in out "flattened"
}

case_missing_or_truncated_backing_files_are_clear_errors() {
  cp $IMAGES/test.ext4 base-copy.ext4
  ember disk create --base "$PWD/base-copy.ext4" top.qcow2 >>out 2>>err || return 1
  rm base-copy.ext4
  mkjob job.img "true"
  boot path=top.qcow2 job.img
  expect_status 1 && expect_in err "base-copy.ext4" || return 1
  : >err
  head -c 100 top.qcow2 >short.qcow2
  boot path=short.qcow2 job.img
  expect_status 1 && expect_in err "short.qcow2"
}

run_cases "$0"
