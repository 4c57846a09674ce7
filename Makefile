# vmsnap.qemu: the two commands of the README, and the pieces they are made of.
#   make demo   - vmsnap.qemu.pre_upgrade over three tiny real guests through the qga connection: one upgraded,
#                 one with a failed health check and one made unreachable, both rolled back (demo-more: the
#                 single-VM demos)
#   make test   - every test layer: ruff, sanity, unit, integration, real-VM tests, examples, molecule, lint, galaxy
# Both install what they need first: Debian packages (via apt-get, with sudo when not root) and .venv.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

APT_PACKAGES := qemu-utils qemu-system-x86 python3-venv util-linux shellcheck git e2fsprogs dpkg apt
VENV := $(CURDIR)/.venv
BUILD := $(CURDIR)/build
# ansible-test and galaxy need a real ansible_collections/vmsnap/qemu path (not a symlink).
COLLECTIONS_ROOT := $(BUILD)/src
COLLECTION_COPY := $(COLLECTIONS_ROOT)/ansible_collections/vmsnap/qemu
INSTALL_ROOT := $(BUILD)/installed
# ansible-test must run outside this git work tree: inside it, it only sees files that git tracks here.
ANSIBLE_TEST_WORK ?= /tmp/vmsnap-ansible-test
VERSION := $(shell sed -n 's/^version: *//p' galaxy.yml)
TARBALL := $(BUILD)/vmsnap-qemu-$(VERSION).tar.gz
# ansible-core 2.19 runs its controller on Python 3.11-3.13.
PYTHON ?= $(shell for p in python3.11 python3.12 python3.13 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(not (3,11) <= sys.version_info[:2] <= (3,13))' 2>/dev/null \
	&& { command -v $$p; break; }; done)

export ANSIBLE_FORCE_COLOR := 0
export ANSIBLE_NOCOLOR := 1
export PY_COLORS := 0

.PHONY: help
help:
	@echo "make demo   - pre_upgrade over three tiny guests through qga: one upgraded, one broken, one unreachable, both rolled back"
	@echo "make demo-more - the single-VM demos (offline, live, checkpoint with RAM)"
	@echo "make test   - run every test layer (installs what it needs)"
	@echo "make soak   - the kill trials (SIGKILLed modules) with VMSNAP_SOAK_TRIALS trials per task kind over VMSNAP_SOAK_SEEDS"
	@echo "make fuzz   - the native qcow2 reader against VMSNAP_FUZZ_CASES mutated images per seed in VMSNAP_FUZZ_SEEDS"
	@echo "make bench  - qcow2_snapshot over many disks and qcow2_chain commit/flatten vs raw qemu-img (for docs/performance.md)"
	@echo "make bench-scale - 1,000 snapshots, a 5,000-image dependants scan, qemu_vm_info over 50 VMs, 200 paths (for docs/performance.md)"
	@echo "make bench-live - guest pause of live snapshots vs HMP savevm (tiny real guest, for docs/performance.md)"
	@echo "make bench-ram - checkpoints with RAM: pause vs HMP savevm, state size, restore time (for docs/performance.md)"
	@echo "make bench-workflow - roles vs direct QMP over fleets of 1/10/30 VMs, rollback time per method (for docs/performance.md)"
	@echo "make bench-backup - qcow2_backup: incremental vs full, full vs cp, on a 1 GiB disk (for docs/performance.md)"

.PHONY: system-packages
system-packages:
	@tools/install-system-packages.sh $(APT_PACKAGES)

$(VENV)/.installed: requirements-dev.txt
	@test -n "$(PYTHON)" || { echo "Python 3.11-3.13 is needed for the Ansible controller" >&2; exit 1; }
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	@touch $@

.PHONY: deps
deps: system-packages $(VENV)/.installed

# A real copy of the tree at .../ansible_collections/vmsnap/qemu, tracked and new files only.
.PHONY: copy
copy:
ifneq ($(VMSNAP_COPIED),1)
	@rm -rf $(COLLECTIONS_ROOT) && mkdir -p $(COLLECTION_COPY)
	@git ls-files -z --cached --others --exclude-standard | \
		while IFS= read -r -d '' f; do [ -e "$$f" ] && printf '%s\0' "$$f"; done | \
		tar --null --no-recursion -T - -cf - | tar -xf - -C $(COLLECTION_COPY)
endif

# vmsnap.qemu.pre_upgrade over three tiny real guests reached through the vmsnap.qemu.qga connection: one upgrade
# succeeds, one breaks the application, one makes its guest unreachable; those two are rolled back (demo/fleet).
.PHONY: demo
demo: deps copy
	ANSIBLE_COLLECTIONS_PATH=$(COLLECTIONS_ROOT) $(VENV)/bin/python demo/fleet/fleet_demo.py

# The single-VM demos: offline rollback of a scratch disk, live rollback of a running VM, checkpoint with RAM.
.PHONY: demo-more
demo-more: deps copy
	ANSIBLE_COLLECTIONS_PATH=$(COLLECTIONS_ROOT) $(VENV)/bin/ansible-playbook -i localhost, demo/offline_rollback.yml
	ANSIBLE_COLLECTIONS_PATH=$(COLLECTIONS_ROOT) $(VENV)/bin/ansible-playbook -i localhost, demo/live_rollback.yml
	ANSIBLE_COLLECTIONS_PATH=$(COLLECTIONS_ROOT) $(VENV)/bin/ansible-playbook -i localhost, demo/ram_checkpoint.yml

# Each layer stops the run when it fails; the last line counts the layers that passed.
# On 2 cores, two lanes side by side, each running its layers one after another (-O: each lane's output comes in
# one piece when it ends; after a failure the other lane finishes its current layer first): integration (one ansible
# task after another, about one core busy), then examples and galaxy; and sanity, units, molecule, lint. The lanes
# share one collection copy, made before they start. vm-tests (two workers) runs alone afterwards.
TEST_LANE_A := integration examples galaxy
TEST_LANE_B := sanity units molecule lint
TEST_LAYERS := ruff changelog-lint $(TEST_LANE_A) $(TEST_LANE_B) vm-tests

.PHONY: test
test: deps
	@$(MAKE) --no-print-directory ruff changelog-lint copy
	@$(MAKE) --no-print-directory -j2 -Otarget test-lane-a test-lane-b
	@$(MAKE) --no-print-directory vm-tests
	@echo "make test layers: $(words $(TEST_LAYERS)) passed, 0 failed"

.PHONY: test-lane-a test-lane-b
test-lane-a:
	@$(MAKE) --no-print-directory VMSNAP_SERIAL=1 VMSNAP_COPIED=1 $(TEST_LANE_A)
test-lane-b:
	@$(MAKE) --no-print-directory VMSNAP_SERIAL=1 VMSNAP_COPIED=1 $(TEST_LANE_B)

# The sub-make of a lane runs its layers one after another.
ifeq ($(VMSNAP_SERIAL),1)
.NOTPARALLEL:
endif

.PHONY: ruff
ruff:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

.PHONY: changelog-lint
changelog-lint:
	$(VENV)/bin/antsibull-changelog lint

.PHONY: sanity
sanity:
	VENV=$(VENV) SRC=$(CURDIR) WORK=$(ANSIBLE_TEST_WORK) STEPS=sanity tools/ansible-test.sh

.PHONY: units
units:
	VENV=$(VENV) SRC=$(CURDIR) WORK=$(ANSIBLE_TEST_WORK) STEPS=units tools/ansible-test.sh

# A work folder of its own: it runs beside sanity and units (tools/ansible-test.sh takes one run per folder at a time).
.PHONY: integration
integration:
	VENV=$(VENV) SRC=$(CURDIR) WORK=$(ANSIBLE_TEST_WORK)-integration STEPS=integration tools/ansible-test.sh

.PHONY: lint
lint: copy
	cd $(COLLECTION_COPY) && ANSIBLE_COLLECTIONS_PATH=$(COLLECTIONS_ROOT) PATH=$(VENV)/bin:$$PATH \
		$(VENV)/bin/ansible-lint --profile production --strict

# Build the tarball, install it into an empty folder, and run a module from the installed copy; then the same on the
# newest patch of every ansible-core minor version the README claims (2.17-2.20, tools/smoke-versions.sh).
.PHONY: galaxy
galaxy:
	rm -rf $(INSTALL_ROOT) $(TARBALL)
	cd $(COLLECTION_COPY) && $(VENV)/bin/ansible-galaxy collection build --force --output-path $(BUILD)
	env -u ANSIBLE_COLLECTIONS_PATH $(VENV)/bin/ansible-galaxy collection install $(TARBALL) -p $(INSTALL_ROOT)
	VENV=$(VENV) INSTALL_ROOT=$(INSTALL_ROOT) tools/smoke-installed.sh
	TARBALL=$(TARBALL) BUILD=$(BUILD) tools/smoke-versions.sh

# Every playbook of examples/ against real VMs (one without a guest OS, and the tiny guest of tests/vm).
.PHONY: examples
examples: copy
	ANSIBLE_COLLECTIONS_PATH=$(COLLECTIONS_ROOT) $(VENV)/bin/python tests/examples/run_examples.py

# The molecule scenarios of extensions/molecule (default driver, no Docker; real VMs in /tmp/vmsnap-molecule or
# $VMSNAP_MOLECULE_DIR): the roles from the copy (prerun is off), each scenario with molecule's idempotence step.
.PHONY: molecule
molecule: copy
	cd $(COLLECTION_COPY) && ANSIBLE_COLLECTIONS_PATH=$(COLLECTIONS_ROOT) PATH=$(VENV)/bin:$$PATH \
		$(VENV)/bin/molecule test --all

# Build the collection from this tree and install it where Ansible looks by default (or into COLLECTIONS_DIR).
COLLECTIONS_DIR ?= $(HOME)/.ansible/collections
.PHONY: install
install: $(VENV)/.installed copy
	cd $(COLLECTION_COPY) && $(VENV)/bin/ansible-galaxy collection build --force --output-path $(BUILD)
	$(VENV)/bin/ansible-galaxy collection install --force $(TARBALL) -p $(COLLECTIONS_DIR)

# The tiny real Linux guest (tests/vm): built from Debian packages into ~/.cache/vmsnap.qemu/guest (or
# $VMSNAP_GUEST_CACHE), booted under TCG;
# qmp_live_snapshot is run through ansible against it (collection from the copy).
.PHONY: vm-tests
# Two workers, one test file each at a time (two files side by side on two cores; each worker runs ansible and
# ansible-playbook through tests/vm/ansible_server.py, which imports ansible once); the tiny guest is built (or found
# in its cache) first, not by both workers.
vm-tests:
	cd tests/vm && $(VENV)/bin/python -c 'from tiny_guest import build_tiny_guest, default_cache_dir as d; build_tiny_guest(d())'
	ANSIBLE_COLLECTIONS_PATH=$(COLLECTIONS_ROOT) $(VENV)/bin/pytest -p no:cacheprovider -q -rs -n 2 --dist loadfile --durations=12 tests/vm

# The kill trials of tests/vm/test_kill_trials*.py (SIGKILL of the module process at seeded moments) with many more
# trials per task kind and other seeds than make test runs (a trial takes 2-5 s: about 30 min per seed);
# VMSNAP_SOAK_TRIALS / VMSNAP_SOAK_SEEDS override. Each
# trial prints a line that names its seed and index (VMSNAP_KILL_SEED=S VMSNAP_KILL_ONLY=group:index replays it).
VMSNAP_SOAK_TRIALS ?= 40
VMSNAP_SOAK_SEEDS ?= 1 2 3
.PHONY: soak
soak: deps copy
	for seed in $(VMSNAP_SOAK_SEEDS); do \
	  VMSNAP_KILL_SEED=$$seed VMSNAP_SOAK_TRIALS=$(VMSNAP_SOAK_TRIALS) ANSIBLE_COLLECTIONS_PATH=$(COLLECTIONS_ROOT) \
	    $(VENV)/bin/pytest -p no:cacheprovider -q -s -k test_kill_ tests/vm/test_kill_trials.py tests/vm/test_kill_trials_live.py || exit 1; \
	done

# The native qcow2 reader fuzzed far longer than make test does (tests/unit/plugins/module_utils/test_qcow2_fuzz.py):
# VMSNAP_FUZZ_CASES mutated real images per seed, VMSNAP_FUZZ_AGREE of the accepted ones compared with qemu-img info.
# It prints cases/s; a failure names its seed and case (VMSNAP_FUZZ_SEED=S VMSNAP_FUZZ_CASE=i replays it).
VMSNAP_FUZZ_CASES ?= 500000
VMSNAP_FUZZ_AGREE ?= 1000
VMSNAP_FUZZ_SEEDS ?= 1 2 3
.PHONY: fuzz
fuzz: deps copy
	for seed in $(VMSNAP_FUZZ_SEEDS); do \
	  VMSNAP_FUZZ_SEED=$$seed VMSNAP_FUZZ_CASES=$(VMSNAP_FUZZ_CASES) VMSNAP_FUZZ_AGREE=$(VMSNAP_FUZZ_AGREE) \
	    PYTHONPATH=$(COLLECTIONS_ROOT) $(VENV)/bin/pytest -p no:cacheprovider -q -s \
	    $(COLLECTION_COPY)/tests/unit/plugins/module_utils/test_qcow2_fuzz.py || exit 1; \
	done

# qcow2_snapshot over 1 and 50 images, and qcow2_chain committed/flattened on a 1 GiB chain, against raw qemu-img.
.PHONY: bench
bench: deps copy
	ANSIBLE_COLLECTIONS_PATH=$(COLLECTIONS_ROOT) $(VENV)/bin/python benchmarks/snapshot_many.py
	ANSIBLE_COLLECTIONS_PATH=$(COLLECTIONS_ROOT) $(VENV)/bin/python benchmarks/chain_ops.py

# Scale: 1,000 internal snapshots vs 1, a dependants scan over 5,000 images, qemu_vm_info over 50 VMs, qcow2_snapshot
# over 200 paths (BENCH_SCALE_PARTS picks parts; the 1,000-snapshot image is cached in ~/.cache/vmsnap.qemu/bench).
.PHONY: bench-scale
bench-scale: deps copy
	ANSIBLE_COLLECTIONS_PATH=$(COLLECTIONS_ROOT) $(VENV)/bin/python benchmarks/scale.py

# Guest pause of qmp_live_snapshot's methods against HMP savevm, on a tiny real guest (tests/vm) under TCG.
.PHONY: bench-live
bench-live: deps copy
	ANSIBLE_COLLECTIONS_PATH=$(COLLECTIONS_ROOT) $(VENV)/bin/python benchmarks/live_pause.py

# Checkpoints with RAM (external + background-snapshot, internal, HMP savevm) and their restore, on the tiny guest.
.PHONY: bench-ram
bench-ram: deps copy
	ANSIBLE_COLLECTIONS_PATH=$(COLLECTIONS_ROOT) $(VENV)/bin/python benchmarks/ram_checkpoint.py

# The workflow roles over fleets of VMs without a guest OS against the same QMP calls made by a script, and the
# rollback time of each method on the tiny guest with 512 MiB of RAM in use.
.PHONY: bench-workflow
bench-workflow: deps copy
	ANSIBLE_COLLECTIONS_PATH=$(COLLECTIONS_ROOT) $(VENV)/bin/python benchmarks/workflow.py

# qcow2_backup on a 1 GiB disk with 5% of its clusters changed: incremental vs full (time, size), full vs cp.
.PHONY: bench-backup
bench-backup: deps copy
	ANSIBLE_COLLECTIONS_PATH=$(COLLECTIONS_ROOT) $(VENV)/bin/python benchmarks/backup.py

.PHONY: clean
clean:
	rm -rf $(BUILD) tests/output
