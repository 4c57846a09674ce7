#!/usr/bin/env bash
# The installed-collection smoke test (tools/smoke-installed.sh) on every ansible-core minor version the README
# claims: the newest patch of each, pinned in tools/versions/ansible-core-<minor>.txt, each in a venv of its own on a
# Python that version supports as a controller. Each version installs the built tarball with its own ansible-galaxy.
# Env: TARBALL (the built collection), BUILD (work folder). CI=true: a missing Python fails the run; elsewhere it is
# reported and that version left out.
set -euo pipefail
: "${TARBALL:?}" "${BUILD:?}"
here="$(cd "$(dirname "$0")" && pwd)"
PYENV_VERSIONS="${PYENV_ROOT:-$HOME/.pyenv}/versions"

# minor version -> controller Python (each inside that version's supported range)
versions=("2.17 3.10" "2.18 3.13" "2.19 3.11" "2.20 3.12")

find_python() {
    local v=$1 c
    for c in "$PYENV_VERSIONS/$v".*/bin/"python$v" "/usr/bin/python$v" "/usr/local/bin/python$v"; do
        if [ -x "$c" ] && "$c" -c 'import venv, ensurepip' 2>/dev/null; then echo "$c"; return 0; fi
    done
    return 1
}

passed="" missing=""
for entry in "${versions[@]}"; do
    read -r minor pyver <<<"$entry"
    requirements="$here/versions/ansible-core-$minor.txt"
    if ! python="$(find_python "$pyver")"; then
        if [ "${CI:-}" = true ]; then echo "ERROR: python$pyver (for ansible-core $minor) not found" >&2; exit 2; fi
        echo "WARNING: python$pyver not found; ansible-core $minor is left out on this machine" >&2
        missing="$missing $minor"
        continue
    fi
    venv="$BUILD/versions/$minor"
    stamp="$venv/.installed-$(sha256sum "$requirements" | cut -c1-16)"
    if [ ! -e "$stamp" ]; then
        rm -rf "$venv"
        "$python" -m venv "$venv"
        "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$requirements"
        touch "$stamp"
    fi
    core="$("$venv/bin/python" -c 'from ansible.release import __version__; print(__version__)')"
    expected="$(sed -n 's/^ansible-core==//p' "$requirements")"
    [ "$core" = "$expected" ] || { echo "ansible-core $core in $venv, expected $expected" >&2; exit 1; }
    root="$venv/installed"
    rm -rf "$root"
    # Its output is shown only on failure (it warns that the folder is not on the configured collections path,
    # which the smoke test sets).
    if ! env -u ANSIBLE_COLLECTIONS_PATH "$venv/bin/ansible-galaxy" collection install "$TARBALL" -p "$root" \
        >"$venv/install.log" 2>&1; then
        cat "$venv/install.log" >&2
        exit 1
    fi
    echo "== ansible-core $core on $("$venv/bin/python" -V)"
    VENV="$venv" INSTALL_ROOT="$root" "$here/smoke-installed.sh"
    passed="$passed $core"
done
echo "installed-collection smoke test passed on ansible-core:$passed${missing:+ (left out:$missing)}"
