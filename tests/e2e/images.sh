# End-to-end tests of images from OCI layouts, run inside the nested harness by tests/e2e/run
# (busybox sh): a two-layer OCI layout built here with busybox (a whiteout, an opaque
# directory, a hard link, a setuid file, a user, a working directory and variables in its
# config) is imported with `ember image import`, a sandbox runs from it by name, and its
# commands run as the image's user, in its working directory, with its variables, without the
# whited-out file; `ember run --detach -- COMMAND` starts COMMAND in the background under the
# image's defaults; the same layers as a `docker save` archive import the same; pushed to a
# registry on the middle machine's loopback, `ember image pull` makes the same image.
#
# Needs in the middle machine (tests/e2e/run carries them): mkfs.ext4 and e2fsck (the image is
# made with mkfs.ext4 -d), docker-registry and skopeo (the registry, the push), the host's CA
# bundle as /opt/ember/extra/ca-certificates.crt (the registry client's), and the static
# agent as /opt/ember/extra/ember-agent (EMBER_AGENT).
. /opt/ember/extra/lib.sh
. /opt/ember/extra/oci.sh
SB=e2e-image
# An installation of the case's own: /opt/ember/images may be read-only, and imported images
# go into $EMBER_HOME/images/oci.
HOME_DIR=/tmp/e2e-image-home
STATE=$HOME/.local/state/ember/sandboxes
EXTRA_LOGS="$STATE/$SB/vmm.log $STATE/$SB/console.log"
export EMBER_AGENT=/opt/ember/extra/ember-agent

in_home() { EMBER_HOME=$HOME_DIR "$@"; }

case_tools_the_import_needs_are_here() {
  for t in mkfs.ext4 e2fsck "$EMBER_AGENT"; do
    command -v "$t" >/dev/null 2>&1 || [ -x "$t" ] || { echo "    $t is missing from the middle machine (tests/e2e/run must carry it)"; return 1; }
  done
  rm -rf "$HOME_DIR" && mkdir -p "$HOME_DIR/images" && ln -s /opt/ember/vmlinux "$HOME_DIR/vmlinux"
}

case_an_oci_layout_imports_and_a_sandbox_runs_from_it_as_its_user() {
  make_layout || return 1
  in_home ember image import layout --name e2e:1 --capacity 64M >out 2>err
  expect_status 0 && expect_in out "e2e:1 sha256:" || { cat err; return 1; }
  in_home ember image ls >ls
  expect_in ls "e2e:1" || return 1
  in_home ember run --detach --name $SB --image e2e:1 >name 2>err
  expect_status 0 || { cat err; return 1; }
  ok=1
  [ "$(in_sb $SB id -u):$(in_sb $SB id -g)" = 1000:1001 ] || { echo "    runs as $(in_sb $SB id), not app"; ok=0; }
  [ "$(in_sb $SB pwd)" = /home/app ] || { echo "    works in $(in_sb $SB pwd), not /home/app"; ok=0; }
  [ "$(in_sb $SB sh -c 'echo $GREETING')" = "hello there" ] || { echo "    GREETING is not the image's"; ok=0; }
  [ "$(in_sb $SB cat /home/app/data)" = data ] || { echo "    the user's file is not readable"; ok=0; }
  in_sb $SB test -e /etc/secret && { echo "    the whited-out /etc/secret is there"; ok=0; }
  [ "$(in_sb $SB ls /opt)" = new ] || { echo "    /opt holds $(in_sb $SB ls /opt), not new alone"; ok=0; }
  [ "$(in_sb $SB stat -c %a /usr/bin/su)" = 4755 ] || { echo "    su is $(in_sb $SB stat -c %a /usr/bin/su)"; ok=0; }
  [ "$(in_sb $SB stat -c %h /bin/tool)" = 2 ] || { echo "    /bin/tool-again is not a hard link"; ok=0; }
  # The command line overrides the image's defaults.
  [ "$(timeout 60 ember exec $SB --user 0:0 --cwd / --env GREETING=mine -- sh -c 'echo $(id -u) $PWD $GREETING' </dev/null)" = "0 / mine" ] ||
    { echo "    --user/--cwd/--env did not override the image's"; ok=0; }
  rm_sb $SB
  [ $ok = 1 ]
}

case_run_detach_starts_a_command_in_the_background_under_the_image_s_defaults() {
  # e2e:1 has no Entrypoint: the command takes the place of its Cmd, as with docker run.
  in_home ember run --detach --name $SB-bg --image e2e:1 -- \
    sh -c 'echo "$(id -u) $PWD $GREETING" >/tmp/started; exec sleep 600' >name 2>err
  expect_status 0 && expect_in err 'started ["sh", "-c"' || { cat err; return 1; }
  ok=1
  for _ in 1 2 3 4 5 6 7 8 9 10; do in_sb $SB-bg test -s /tmp/started && break; sleep 0.5; done
  [ "$(in_sb $SB-bg cat /tmp/started)" = "1000 /home/app hello there" ] ||
    { echo "    the command saw '$(in_sb $SB-bg cat /tmp/started)', not the image's user, directory and variables"; ok=0; }
  [ "$(in_sb $SB-bg sh -c 'cat /proc/[0-9]*/comm 2>/dev/null | grep -cx sleep')" = 1 ] || { echo "    the command is not running"; ok=0; }
  rm_sb $SB-bg
  # A command that cannot start takes its sandbox with it.
  in_home ember run --detach --name $SB-nostart --image e2e:1 -- /no/such/program >name 2>err
  expect_status 1 && expect_in err "sandbox $SB-nostart removed" || ok=0
  ember ls | grep -q "^$SB-nostart " && { echo "    $SB-nostart was left running"; rm_sb $SB-nostart; ok=0; }
  [ $ok = 1 ]
}

case_a_docker_save_archive_of_the_same_layers_imports_the_same() {
  make_layers || return 1
  config_json >config.json
  c=$(sha256sum config.json | cut -d' ' -f1)
  mkdir -p saved/l1 saved/l2
  cp config.json "saved/$c.json" && cp base.tar saved/l1/layer.tar && cp top.tar saved/l2/layer.tar
  printf '[{"Config": "%s.json", "RepoTags": ["e2e:2"], "Layers": ["l1/layer.tar", "l2/layer.tar"]}]' "$c" >saved/manifest.json
  (cd saved && tar -cf ../saved.tar .) || return 1
  in_home ember image import saved.tar --capacity 64M >out 2>err
  expect_status 0 && expect_in out "e2e:2 sha256:$c" || { cat err; return 1; }
  in_home ember image ls --json >ls.json
  expect_in ls.json '"User": "app"' && expect_in ls.json '"WorkingDir": "/home/app"'
}

case_bad_layouts_are_refused_naming_the_layer_and_leave_nothing() {
  # Another image than e2e:1: an image built before from a manifest is not built again.
  make_layout bad || return 1
  top=$(sha256sum top.tar | cut -d' ' -f1)
  printf 'x' | dd of="layout/blobs/sha256/$top" bs=1 seek=700 conv=notrunc 2>/dev/null
  in_home ember image import layout --name bad:1 --capacity 64M >out 2>err
  expect_status 1 && expect_in err "layer sha256:$top" && expect_in err "digest mismatch" || return 1
  left=$(ls -A "$HOME_DIR/images/oci" | grep -v -e '^index.json$' -e '^\.lock$' -e '\.ext4$' -e '\.json$')
  [ -z "$left" ] || { echo "    left behind: $left"; return 1; }
  in_home ember image ls >ls
  ! grep -q bad:1 ls || { echo "    bad:1 was named"; return 1; }
}

case_a_pull_from_a_loopback_registry_runs_a_sandbox_as_its_user() {
  make_layout pulled && registry && push_layout 127.0.0.1:5000/e2e:3 || return 1
  # The middle machine has no CA bundle, which the registry client needs even for plain HTTP.
  in_home ember image pull 127.0.0.1:5000/e2e:3 --capacity 64M >out 2>err
  expect_status 1 && expect_in err "this host has no CA certificates" || return 1
  SSL_CERT_FILE=/opt/ember/extra/ca-certificates.crt in_home ember image pull 127.0.0.1:5000/e2e:3 --capacity 64M >out 2>err
  expect_status 0 && expect_in out "e2e:3 sha256:" || { cat err; return 1; }
  kill $REGISTRY_PID
  grep -q 'GET /v2/e2e/blobs/sha256:' reg.log || { echo "    the registry served no blob"; return 1; }
  ok=1
  if in_home ember run --detach --name $SB-pulled --image e2e:3 >name 2>err; then
    [ "$(in_sb $SB-pulled cat /etc/variant)" = pulled ] || { echo "    /etc/variant is '$(in_sb $SB-pulled cat /etc/variant)'"; ok=0; }
    [ "$(in_sb $SB-pulled id -un) $(in_sb $SB-pulled pwd)" = "app /home/app" ] || { echo "    not the image's user and directory"; ok=0; }
    in_sb $SB-pulled test -e /etc/secret && { echo "    the whited-out /etc/secret is there"; ok=0; }
    rm_sb $SB-pulled
  else
    cat err; ok=0
  fi
  # Its automatic template and the image go whatever happened, so that the next case finds
  # e2e:1's alone.
  file=$(awk '{print $3}' out)
  auto=$(ember template ls | awk -v f="$file" '$NF == f {print $1}')
  [ -z "$auto" ] || ember template rm $auto
  in_home ember image rm e2e:3 || { echo "    cannot remove e2e:3"; ok=0; }
  [ $ok = 1 ]
}

case_image_rm_forgets_the_names_and_the_files() {
  auto=$(ember template ls | awk '/e2e-image-home/ {print $1}')
  [ -n "$auto" ] || { echo "    no automatic template on the image"; return 1; }
  in_home ember image rm e2e:1 2>err
  expect_status 1 && expect_in err "ember template rm $auto" || return 1
  ember template rm $auto && in_home ember image rm e2e:1 e2e:2 2>err
  expect_status 0 || return 1
  n=$(ls "$HOME_DIR/images/oci" | grep -c '\.ext4$')
  [ "$n" = 0 ] || { echo "    $n image files left"; return 1; }
}

run_cases "$0"
