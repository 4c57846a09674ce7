#!/usr/bin/env bash
# ansible-test sanity, units and integration for vmsnap.qemu, with no Docker and no access to ansible-test's
# download host (a get-pip stand-in bootstraps its venvs from ensurepip and PyPI).
# Env: VENV (ansible-core 2.19, py3.11)  SRC (collection root)  [WORK=/tmp/vmsnap-ansible-test (keep it: caches venvs)]
#      [SANITY_PYTHONS="3.9 3.10 3.11 3.12 3.13"] [UNITS_PYTHONS="3.9 3.10 3.11 3.12 3.13"] [STEPS="sanity units integration"]
#      [SANITY_ARGS= UNITS_ARGS= INTEGRATION_ARGS=] [STRICT=1: fail if any test was skipped]
#      [PYENV_VERSIONS=~/.pyenv/versions]
# Interpreters: each X.Y is taken from pyenv or /usr/bin; the module floor (3.9) is in tests/config.yml.
set -euo pipefail
: "${VENV:?}" "${SRC:?}"
WORK="${WORK:-/tmp/vmsnap-ansible-test}"; SANITY_PYTHONS="${SANITY_PYTHONS:-3.9 3.10 3.11 3.12 3.13}"
UNITS_PYTHONS="${UNITS_PYTHONS:-3.9 3.10 3.11 3.12 3.13}"; STEPS="${STEPS:-sanity units integration}"; STRICT="${STRICT:-1}"
PYENV_VERSIONS="${PYENV_VERSIONS:-${PYENV_ROOT:-$HOME/.pyenv}/versions}"; CTL=3.11
SRC="$(cd "$SRC" && pwd -P)"; VENV="$(cd "$VENV" && pwd -P)"; AT="$VENV/bin/ansible-test"
[ -x "$AT" ] || { echo "ERROR: no ansible-test in $VENV" >&2; exit 2; }
mkdir -p "$WORK/bin" "$WORK/logs"; WORK="$(cd "$WORK" && pwd -P)"; DEST="$WORK/ansible_collections/vmsnap/qemu"
exec 9>"$WORK/.lock"; flock 9                                   # one run per WORK at a time

# 1. get-pip stand-in (file name follows the pip pin in ansible_test/_internal/python_requirements.py)
pv="$("$VENV/bin/python" -c 'import re,pathlib,ansible_test as a;print(re.search(r"pip=.([0-9.]+).",(pathlib.Path(a.__file__).parent/"_internal/python_requirements.py").read_text()).group(1))')"
gp="$HOME/.ansible/test/cache/get_pip_${pv//./_}.py"; mkdir -p "${gp%/*}"
cat > "$gp.$$" <<'EOF'
"""Offline stand-in for get-pip.py. ensurepip runs in a subprocess (in-process it hides /etc/pip.conf)."""
import subprocess
import sys
args = [a for a in sys.argv[1:] if a not in ('--no-setuptools', '--no-wheel')]
subprocess.check_call([sys.executable, '-m', 'ensurepip', '--upgrade'], stdout=subprocess.DEVNULL)
subprocess.check_call([sys.executable, '-m', 'pip', 'install', '-q', '--upgrade'] + args)
for flag, pkg in (('--no-setuptools', 'setuptools'), ('--no-wheel', 'wheel')):  # mimic real get-pip
    if flag in sys.argv:
        subprocess.call([sys.executable, '-m', 'pip', 'uninstall', '-q', '-y', pkg],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
EOF
mv -f "$gp.$$" "$gp"

# 2. real interpreters first on PATH (non-global pyenv shims exit 127; import test looks up pythonX.Y on PATH).
# A machine without some of the extra versions (a plain Debian has only its python3) tests the ones it has;
# CI (CI=true) must have them all.
found=" "
for v in $CTL $SANITY_PYTHONS $UNITS_PYTHONS; do
  case "$found" in *" $v "*) continue ;; esac
  for c in "$PYENV_VERSIONS/$v".*/bin/"python$v" "/usr/bin/python$v" "/usr/local/bin/python$v"; do
    if [ -x "$c" ] && "$c" -c 'import venv, ensurepip' 2>/dev/null; then ln -sfn "$c" "$WORK/bin/python$v"; found="$found$v "; break; fi
  done
done
keep_found() { local out="" v; for v in $1; do case "$found" in *" $v "*) out="$out $v" ;; esac; done; echo "${out# }"; }
case "$found" in *" $CTL "*) ;; *) echo "ERROR: python$CTL (the controller) not found" >&2; exit 2 ;; esac
missing=" "
for v in $SANITY_PYTHONS $UNITS_PYTHONS; do
  case "$found$missing" in *" $v "*) continue ;; esac
  if [ "${CI:-}" = true ]; then echo "ERROR: python$v not found" >&2; exit 2; fi
  echo "WARNING: python$v not found; its compile/import/unit runs are left out on this machine" >&2; missing="$missing$v "
done
SANITY_PYTHONS="$(keep_found "$SANITY_PYTHONS")"; UNITS_PYTHONS="$(keep_found "$UNITS_PYTHONS")"
export PATH="$WORK/bin:$VENV/bin:$PATH"; unset ANSIBLE_COLLECTIONS_PATH ANSIBLE_COLLECTIONS_PATHS PYTHONPATH

# 3. copy SRC to a real ansible_collections/vmsnap/qemu; keep tests/output (cached delegation venvs)
mkdir -p "$DEST"; find "$DEST" -mindepth 1 -maxdepth 1 ! -name tests -exec rm -rf {} +
[ ! -d "$DEST/tests" ] || find "$DEST/tests" -mindepth 1 -maxdepth 1 ! -name output -exec rm -rf {} +
if git -C "$SRC" rev-parse --is-inside-work-tree >/dev/null 2>&1; then   # tracked + untracked-not-ignored
  (cd "$SRC" && git ls-files -z --cached --others --exclude-standard -- . ':!:.venv' ':!:.git' ':!:tests/output' \
     | while IFS= read -r -d '' f; do if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi; done \
     | tar --null --no-recursion -T - -cf -) | tar -xf - -C "$DEST"
else
  tar -C "$SRC" --exclude=./.venv --exclude=./.git --exclude=./tests/output --exclude=__pycache__ \
      --exclude='*.pyc' --exclude=./.pytest_cache -cf - . | tar -xf - -C "$DEST"
fi
# the shellcheck sanity test merely warns and skips when the binary is missing
if [ -n "$(find "$DEST" -path "$DEST/tests/output" -prune -o -name '*.sh' -print -quit)" ] && ! command -v shellcheck >/dev/null; then
  [ "$(id -u)" = 0 ] || { echo "ERROR: *.sh present, shellcheck missing" >&2; exit 2; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends shellcheck >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends shellcheck >/dev/null; }
fi

# 4. run
cd "$DEST"; rc=0
for step in $STEPS; do
  args=(--controller "origin:python=venv/$CTL")
  case "$step" in
    sanity) for v in $SANITY_PYTHONS; do args+=(--target-python "$v"); done; extra="${SANITY_ARGS:-}" ;;  # venv/ refused here
    units)  for v in $UNITS_PYTHONS; do args+=(--target-python "venv/$v"); done; extra="${UNITS_ARGS:-}" ;;
    # Real qemu-img and QEMU VMs on this host: the targets need root (mounts) and are marked destructive.
    integration) args=(--venv --python "$CTL" --allow-destructive); extra="${INTEGRATION_ARGS:-}" ;;
    *) echo "ERROR: unknown step $step" >&2; exit 2 ;;
  esac
  echo "== ansible-test $step ${args[*]}"
  set +e
  # shellcheck disable=SC2086  # extra args are split on purpose
  "$AT" "$step" "${args[@]}" --requirements --color no $extra 2>&1 | tee "$WORK/logs/$step.log"
  r=${PIPESTATUS[0]}; set -e
  if [ "$r" = 0 ] && [ "$STRICT" = 1 ] && grep -E "Skipping sanity test|Skipping tests disabled|Required program .* not found|All targets skipped" \
       "$WORK/logs/$step.log" | grep -v '^WARNING: Reviewing'; then echo "ERROR: $step skipped tests (STRICT=1)" >&2; r=1; fi
  if [ "$r" = 0 ] && [ "$step" = integration ]; then   # every test target must really have run
    for t in tests/integration/targets/*/; do
      t="$(basename "$t")"; case "$t" in setup_*) continue ;; esac
      grep -q "^Running $t integration test role" "$WORK/logs/$step.log" || { echo "ERROR: target $t did not run" >&2; r=1; }
    done
  fi
  [ "$r" = 0 ] || rc=1
done
echo "== result rc=$rc (logs: $WORK/logs, tree: $DEST)"; exit $rc
