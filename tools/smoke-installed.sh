#!/usr/bin/env bash
# Runs the modules from the collection as installed from the built tarball, and checks the image with qemu-img.
# Env: VENV (with ansible-core), INSTALL_ROOT (the -p folder given to ansible-galaxy collection install).
set -euo pipefail
: "${VENV:?}" "${INSTALL_ROOT:?}"

installed="$INSTALL_ROOT/ansible_collections/vmsnap/qemu"
test -f "$installed/MANIFEST.json" || { echo "no installed collection at $installed" >&2; exit 1; }
test ! -e "$installed/.venv" || { echo "the tarball packed .venv" >&2; exit 1; }

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
qemu-img create -q -f qcow2 "$scratch/smoke.qcow2" 16M

export ANSIBLE_COLLECTIONS_PATH="$INSTALL_ROOT"
run() {
    "$VENV/bin/ansible" localhost -i localhost, -c local -o \
        -e "ansible_python_interpreter=$VENV/bin/python" -m "$@"
}
out=$(run vmsnap.qemu.qcow2_snapshot -a "path=$scratch/smoke.qcow2 name=smoke")
echo "$out"
grep -q '| CHANGED =>' <<<"$out"
out=$(run vmsnap.qemu.qcow2_snapshot -a "path=$scratch/smoke.qcow2 name=smoke")
grep -q '| SUCCESS =>' <<<"$out" || { echo "second run was not unchanged: $out" >&2; exit 1; }
qemu-img snapshot -l "$scratch/smoke.qcow2" | grep -q ' smoke ' || { echo "qemu-img does not list the snapshot" >&2; exit 1; }
out=$(run vmsnap.qemu.qcow2_info -a "path=$scratch/smoke.qcow2")
grep -q '"name": "smoke"' <<<"$out" || { echo "qcow2_info did not report the snapshot: $out" >&2; exit 1; }
"$VENV/bin/ansible-doc" -t module vmsnap.qemu.qcow2_snapshot | grep -q "VMSNAP.QEMU.QCOW2_SNAPSHOT"
echo "smoke test of the installed collection passed ($installed)"
