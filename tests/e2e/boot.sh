# End-to-end boot tests, run inside the nested harness by tests/e2e/run (busybox sh).
# Needs /opt/ember/extra/init.cpio.gz (tests/e2e/make-initramfs).
. /opt/ember/extra/lib.sh
INITRD=/opt/ember/extra/init.cpio.gz

case_boot_reaches_init() {
  ember run --initrd "$INITRD" --stats >out 2>err
  expect_status 0 && expect_in out "EMBER-GUEST-MARKER: init reached" && expect_in err "ember stats: vm exits"
}

case_default_kernel_comes_from_ember_home() {
  [ "$EMBER_HOME" = /opt/ember ] || return 1
  ember run --kernel "$EMBER_HOME/vmlinux" --initrd "$INITRD" --cmdline ember_test=quick >out 2>err
  expect_status 0
}

case_guest_panic_is_not_success() {
  ember run --initrd "$INITRD" --cmdline ember_test=panic >out 2>err
  expect_status 2 && expect_in err "the guest kernel panicked: " && expect_in err "Attempted to kill init"
}

case_two_vcpus_come_up() {
  ember run --vcpus 2 --initrd "$INITRD" --cmdline ember_test=cpus >out 2>err
  expect_status 0 && expect_in out "guest: cpus online: 0-1" && expect_in out "guest: processors: 2" &&
    expect_in out "guest: packages: 1" && expect_in out "guest: cores per package: 2 " &&
    expect_in out "guest: apic ids: 0 1 "
}

case_four_vcpus_come_up() {
  ember run --vcpus 4 --mem-mib 512 --initrd "$INITRD" --cmdline ember_test=cpus >out 2>err
  expect_status 0 && expect_in out "guest: cpus online: 0-3" && expect_in out "guest: packages: 1" &&
    expect_in out "guest: apic ids: 0 1 2 3 "
}

case_guest_uses_kvmclock_tsc_deadline_and_x2apic() {
  ember run --initrd "$INITRD" --cmdline "ember_test=clock" >out 2>err
  expect_status 0 && expect_in out "guest: clocksource: kvm-clock" && expect_in out "TSC deadline timer available" &&
    expect_in out "x2apic enabled"
}

case_missing_kernel_is_named() {
  ember run --kernel /opt/ember/no-such-vmlinux --initrd "$INITRD" >out 2>err
  expect_status 1 && expect_in err "cannot open kernel /opt/ember/no-such-vmlinux"
}

case_non_elf_kernel_is_refused() {
  ember run --kernel "$INITRD" >out 2>err
  expect_status 1 && expect_in err "is not an ELF vmlinux"
}

case_memory_too_small_for_the_kernel() {
  ember run --initrd "$INITRD" --mem-mib 16 >out 2>err
  expect_status 1 && expect_in err "too small for kernel"
}

case_too_many_vcpus() {
  ember run --initrd "$INITRD" --vcpus 255 >out 2>err
  expect_status 1 && expect_in err "255 vCPUs"
}

case_missing_dev_kvm_is_explained() {
  mv /dev/kvm /dev/kvm.hidden
  ember run --initrd "$INITRD" >out 2>err
  mv /dev/kvm.hidden /dev/kvm
  expect_status 1 && expect_in err "/dev/kvm does not exist"
}

run_cases "$0"
