#!/usr/bin/env bash
# Runs the modules from the collection as installed from the built tarball, and checks the image with qemu-img.
# Env: VENV (with ansible-core), INSTALL_ROOT (the -p folder given to ansible-galaxy collection install).
set -euo pipefail
: "${VENV:?}" "${INSTALL_ROOT:?}"

installed="$INSTALL_ROOT/ansible_collections/vmsnap/qemu"
test -f "$installed/MANIFEST.json" || { echo "no installed collection at $installed" >&2; exit 1; }
for unwanted in .venv .git build tools demo tests/output; do
    test ! -e "$installed/$unwanted" || { echo "the tarball packed $unwanted" >&2; exit 1; }
done

scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
qemu-img create -q -f qcow2 "$scratch/smoke.qcow2" 16M

# Only the installed copy is visible to Ansible.
export ANSIBLE_COLLECTIONS_PATH="$INSTALL_ROOT"
"$VENV/bin/ansible-playbook" -i localhost, "$(dirname "$0")/smoke-installed.yml" -e "smoke_image=$scratch/smoke.qcow2"
"$VENV/bin/ansible-doc" -t module vmsnap.qemu.qcow2_snapshot | grep -qF "($installed/plugins/modules/qcow2_snapshot.py)"
echo "smoke test of the installed collection passed ($installed)"
