# The demo's sandbox, inside the nested harness (busybox sh).
ember run --initrd /opt/ember/extra/init.cpio.gz --cmdline ember_test=demo --stats
