# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The vmsnap.qemu.qga connection plugin against real guests, through ansible-playbook.

The tiny guest has busybox and qemu-guest-agent but no Python: raw, script and the plugin's own file transfers must
work there. The Python guest (python_guest.py) adds Debian's Python 3.11, so real modules run through the plugin.
What the guest holds is checked from inside, over its serial shell, never through the plugin under test.

Two test-only plugins come from tests/vm/qga_plugins: the action qga_probe calls the connection's exec_command,
put_file and fetch_file directly (byte-exact output, which raw's text results cannot show), and the callback
qga_results records every task result with its status (ok, failed, unreachable). The collection is taken from
$ANSIBLE_COLLECTIONS_PATH (`make vm-tests` points it at build/src).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
import socket
import threading
import time
import typing as t
from pathlib import Path

import pytest
from ansible_server import run_ansible
from conftest import BOOT_TIMEOUT, REPO, cache_dir
from python_guest import build_python_guest
from tiny_guest import GuestImage, GuestVM, make_ext4_qcow2

HERE = Path(__file__).resolve().parent
PLAYBOOK = Path(os.environ.get("VMSNAP_ANSIBLE_PLAYBOOK") or REPO / ".venv" / "bin" / "ansible-playbook")
CONNECTION = "vmsnap.qemu.qga"


@dataclasses.dataclass
class PlayRun:
    rc: int
    seconds: float
    results: list[dict[str, t.Any]]
    output: str

    def task(self, name: str, host: str | None = None) -> dict[str, t.Any]:
        """The one result of a task (on a host); 'status' is ok, failed, unreachable or skipped."""
        found = [r for r in self.results if r["task"] == name and host in (None, r["host"])]
        assert len(found) == 1, f"{len(found)} results for {name!r} on {host}:\n{self.output}"
        return {"status": found[0]["status"], **found[0]["result"]}


def play(workdir: Path, hosts: dict[str, dict[str, t.Any]], tasks: list[dict[str, t.Any]]) -> PlayRun:
    """Run one play over hosts with ansible-playbook; every task result comes back with its status."""
    workdir.mkdir(parents=True, exist_ok=True)
    inventory = workdir / "inventory.yml"
    inventory.write_text(json.dumps({"all": {"hosts": hosts}}))  # JSON is YAML
    playbook = workdir / "playbook.yml"
    playbook.write_text(json.dumps([{"name": "qga", "hosts": "all", "gather_facts": False, "tasks": tasks}]))
    results = workdir / "results.jsonl"
    results.unlink(missing_ok=True)
    env = dict(
        os.environ,
        ANSIBLE_ACTION_PLUGINS=str(HERE / "qga_plugins" / "action"),
        ANSIBLE_CALLBACK_PLUGINS=str(HERE / "qga_plugins" / "callback"),
        ANSIBLE_CALLBACKS_ENABLED="qga_results",
        VMSNAP_QGA_RESULTS=str(results),
        ANSIBLE_RETRY_FILES_ENABLED="0",
        ANSIBLE_NOCOLOR="1",
        LANG="C.UTF-8",
    )
    env.setdefault("ANSIBLE_COLLECTIONS_PATH", str(REPO / "build" / "src"))
    started = time.monotonic()
    proc = run_ansible([str(PLAYBOOK), "-i", str(inventory), str(playbook)], env, 600, cwd=workdir)
    seconds = time.monotonic() - started
    lines = results.read_text(encoding="utf-8").splitlines() if results.exists() else []
    return PlayRun(proc.returncode, seconds, [json.loads(line) for line in lines], proc.stdout + proc.stderr)


def qga_host(vm: GuestVM, **extra: t.Any) -> dict[str, t.Any]:
    return {"ansible_connection": CONNECTION, "vmsnap_qga_socket": str(vm.qga_socket), **extra}


def guest_ok(vm: GuestVM, cmd: str, timeout: float = 60.0) -> str:
    """Run cmd over the serial shell (not through the plugin under test)."""
    rc, out = vm.run(cmd, timeout=timeout)
    assert rc == 0, f"{cmd!r} failed in the guest ({rc}): {out}"
    return out


def guest_sha256(vm: GuestVM, path: str) -> str:
    return guest_ok(vm, f"sync; echo 3 > /proc/sys/vm/drop_caches; sha256sum '{path}'").split()[0]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def probe(name: str, op: str, **args: t.Any) -> dict[str, t.Any]:
    return {"name": name, "qga_probe": {"op": op, **args}, "ignore_errors": True}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(result: dict[str, t.Any], key: str) -> bytes:
    return base64.b64decode(result[key])


# --- the tiny guest: busybox and the agent, no Python ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[GuestVM]:
    work = tmp_path_factory.mktemp("qga-tiny")
    disk = make_ext4_qcow2(work / "data.qcow2", size_mib=64)
    # 384 MiB: the agent needs several times a command's 16 MiB of kept output to send it (128 MiB: OOM kill).
    with GuestVM(guest_image, [disk], work / "vm", memory_mib=384) as vm:
        vm.wait_ready(BOOT_TIMEOUT)
        rc, out = vm.run("command -v python3 || command -v python || ls /usr/bin/python* /usr/lib/python3*")
        assert rc != 0, f"the tiny guest must not have Python: {out}"
        yield vm


def test_raw_and_script_exit_codes_and_exact_output_without_python(tiny: GuestVM, tmp_path: Path) -> None:
    script = tmp_path / "report.sh"
    script.write_text('#!/bin/sh\necho "args=$# [$1] [$2]"\necho "to stderr" >&2\nexit "${EXIT:-0}"\n')
    failing = tmp_path / "failing.sh"
    failing.write_text("#!/bin/sh\nprintf 'partial'\nprintf 'no such thing\\n' >&2\nexit 5\n")
    stdin = bytes(range(256)) + os.urandom(1024 * 1024)
    run = play(
        tmp_path / "play",
        {"tiny": qga_host(tiny)},
        [
            {
                "name": "fails",
                "ansible.builtin.raw": "printf 'out\\n'; printf 'err\\n' >&2; exit 7",
                "ignore_errors": True,
            },
            {"name": "utf8", "ansible.builtin.raw": "echo 'grüße 日本'"},
            {"name": "binary-raw", "ansible.builtin.raw": "printf '\\377\\000\\001'"},
            probe("binary-exact", "exec", cmd="printf '\\377\\000\\001'; printf '\\200x\\376' >&2; exit 3"),
            probe("stdin", "exec", cmd="cat; printf end", stdin_b64=b64(stdin)),
            probe("signal", "exec", cmd="kill -9 $$"),
            {"name": "script", "ansible.builtin.script": f"{script} one 'two words'"},
            {"name": "script-fails", "ansible.builtin.script": str(failing), "ignore_errors": True},
        ],
    )
    assert run.rc == 0, run.output

    fails = run.task("fails")
    assert fails["status"] == "failed" and fails["rc"] == 7, fails
    assert (fails["stdout"], fails["stderr"]) == ("out\n", "err\n")
    utf8 = run.task("utf8")
    assert utf8["status"] == "ok" and utf8["rc"] == 0
    assert (utf8["stdout"], utf8["stderr"]) == ("grüße 日本\n", "")
    # raw returns text: Ansible decodes the bytes with surrogate escapes (0xff -> U+DCFF); the probe shows the bytes.
    assert run.task("binary-raw")["stdout"] == "\udcff\x00\x01"
    exact = run.task("binary-exact")
    assert exact["status"] == "ok" and exact["exit_code"] == 3, exact
    assert unb64(exact, "stdout_b64") == b"\xff\x00\x01"
    assert unb64(exact, "stderr_b64") == b"\x80x\xfe"
    piped = run.task("stdin")
    assert piped["exit_code"] == 0 and unb64(piped, "stdout_b64") == stdin + b"end"
    assert run.task("signal")["exit_code"] == 128 + 9

    ran = run.task("script")
    assert ran["status"] == "ok" and ran["rc"] == 0, ran
    assert ran["stdout"] == "args=2 [one] [two words]\n"
    assert ran["stderr"] == "to stderr\n"
    failed = run.task("script-fails")
    assert failed["status"] == "failed" and failed["rc"] == 5, failed
    assert (failed["stdout"], failed["stderr"]) == ("partial", "no such thing\n")


def test_a_command_that_outlives_the_timeout_fails_as_a_timeout(tiny: GuestVM, tmp_path: Path) -> None:
    run = play(
        tmp_path / "play",
        {"tiny": qga_host(tiny)},
        [
            {
                "name": "slow",
                "ansible.builtin.raw": "sleep 40; echo finished",
                "vars": {"vmsnap_qga_timeout": 2},
                "ignore_errors": True,
            },
            {"name": "after", "ansible.builtin.raw": "echo still usable"},
        ],
    )
    slow = run.task("slow")
    assert slow["status"] == "failed", slow  # a task failure: the host answered, the command did not finish
    assert "timed out" in slow["msg"] and "after 2 s" in slow["msg"], slow["msg"]
    assert "may still be running" in slow["msg"]
    assert "finished" not in json.dumps(slow.get("stdout", ""))
    assert run.task("after")["stdout"] == "still usable\n"
    assert run.seconds < 30, run.seconds
    pid = re.search(r"process (\d+)", slow["msg"])
    assert pid, slow["msg"]
    # The message tells the truth: that process is still there, running the command.
    cmdline = guest_ok(tiny, f"tr '\\0' ' ' < /proc/{pid.group(1)}/cmdline")
    assert "sleep 40; echo finished" in cmdline, cmdline
    guest_ok(tiny, f"pkill -P {pid.group(1)}; kill {pid.group(1)} 2>/dev/null; true")


def test_output_the_agent_cut_off_is_an_error(tiny: GuestVM, tmp_path: Path) -> None:
    run = play(
        tmp_path / "play",
        {"tiny": qga_host(tiny, vmsnap_qga_timeout=120)},
        [{"name": "huge", "ansible.builtin.raw": "head -c 17000000 /dev/zero; echo done >&2", "ignore_errors": True}],
    )
    huge = run.task("huge")
    assert huge["status"] == "failed", {k: v for k, v in huge.items() if k != "stdout"}
    assert "standard output was cut off by qemu-guest-agent" in huge["msg"], huge["msg"]
    assert "16 MiB" in huge["msg"] and "not returned in part" in huge["msg"]
    assert "stdout" not in huge


def test_put_and_fetch_are_byte_exact(tiny: GuestVM, tmp_path: Path) -> None:
    sources = {
        "/mnt/data/chunks.bin": os.urandom(3 * 1024 * 1024 + 123),  # three full 1 MiB chunks and a partial one
        "/mnt/data/empty": b"",
        "/mnt/data/sub dir/grüße.txt": "ünïcödé\n".encode() * 1000,
    }
    guest_ok(tiny, "mkdir -p '/mnt/data/sub dir'")
    local = tmp_path / "local"
    local.mkdir()
    tasks = []
    for i, (path, data) in enumerate(sources.items()):
        (local / f"src{i}").write_bytes(data)
        tasks.append(probe(f"put{i}", "put", src=str(local / f"src{i}"), dest=path))
    for i, path in enumerate(sources):
        tasks.append(probe(f"fetch{i}", "fetch", src=path, dest=str(local / f"back{i}")))
    tasks.append(probe("fetch-missing", "fetch", src="/mnt/data/missing", dest=str(local / "missing")))
    tasks.append(probe("put-no-folder", "put", src=str(local / "src0"), dest="/mnt/data/no/such/folder"))
    tasks.append(probe("put-no-source", "put", src=str(local / "absent"), dest="/mnt/data/x"))
    run = play(tmp_path / "play", {"tiny": qga_host(tiny)}, tasks)
    assert run.rc == 0, run.output

    for i, (path, data) in enumerate(sources.items()):
        assert run.task(f"put{i}")["status"] == "ok", run.task(f"put{i}")
        assert run.task(f"fetch{i}")["status"] == "ok", run.task(f"fetch{i}")
        assert guest_sha256(tiny, path) == sha256(data), path
        assert sha256((local / f"back{i}").read_bytes()) == sha256(data), path
    missing = run.task("fetch-missing")
    assert missing["status"] == "failed" and "Cannot read /mnt/data/missing" in missing["msg"], missing
    assert "unreachable" not in missing
    no_folder = run.task("put-no-folder")
    assert no_folder["status"] == "failed" and "Cannot write /mnt/data/no/such/folder" in no_folder["msg"]
    assert run.task("put-no-source")["status"] == "failed"
    # A failed download leaves nothing behind, not even its partial file.
    assert sorted(p.name for p in local.iterdir() if not p.name.startswith("src")) == ["back0", "back1", "back2"]


class SilentAgent:
    """A socket that accepts and never answers: what QEMU's socket looks like when no agent runs in the guest."""

    def __init__(self, path: Path) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(8)
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, dummy = self.server.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.server.close()
        for conn in self.accepted:
            conn.close()


def test_an_agent_that_does_not_answer_makes_the_host_unreachable_in_bounded_time(tmp_path: Path) -> None:
    silent = SilentAgent(tmp_path / "silent.sock")
    try:
        hosts = {
            "silent": {"ansible_connection": CONNECTION, "vmsnap_qga_socket": str(tmp_path / "silent.sock")},
            "missing": {"ansible_connection": CONNECTION, "vmsnap_qga_socket": str(tmp_path / "missing.sock")},
        }
        for host in hosts.values():
            host["vmsnap_qga_connect_timeout"] = 2
        run = play(tmp_path / "play", hosts, [{"name": "echo", "ansible.builtin.raw": "echo hi"}])
    finally:
        silent.close()
    assert run.rc == 4, run.output  # ansible-playbook: some hosts were unreachable
    quiet = run.task("echo", "silent")
    assert quiet["status"] == "unreachable", quiet
    assert "did not answer within 2 s" in quiet["msg"] and "qemu-guest-agent" in quiet["msg"], quiet["msg"]
    assert silent.accepted, "the plugin never connected"
    missing = run.task("echo", "missing")
    assert missing["status"] == "unreachable" and "does not exist" in missing["msg"], missing
    assert run.seconds < 20, run.seconds  # 2 s connect timeout (hosts in parallel) plus ansible's own start


def test_a_killed_agent_makes_the_guest_unreachable_and_a_restarted_one_answers(tiny: GuestVM, tmp_path: Path) -> None:
    """Last test of the tiny guest: it kills the guest's agent (and starts it again)."""
    pid = guest_ok(tiny, "cat /run/qemu-ga.pid").strip()
    argv = guest_ok(tiny, f"tr '\\0' ' ' < /proc/{pid}/cmdline").strip()
    assert "qemu-ga" in argv, argv
    guest_ok(tiny, f"kill {pid}; while kill -0 {pid} 2>/dev/null; do sleep 0.1; done")
    gone = play(
        tmp_path / "gone",
        {"tiny": qga_host(tiny, vmsnap_qga_connect_timeout=3)},
        [{"name": "echo", "ansible.builtin.raw": "echo hi"}],
    )
    echo = gone.task("echo")
    assert echo["status"] == "unreachable", echo
    assert "did not answer within 3 s" in echo["msg"], echo["msg"]
    assert gone.rc == 4 and gone.seconds < 20, (gone.rc, gone.seconds)

    guest_ok(tiny, f"rm -f /run/qemu-ga.pid; LD_LIBRARY_PATH=/lib/x86_64-linux-gnu {argv}")
    back = play(tmp_path / "back", {"tiny": qga_host(tiny)}, [{"name": "echo", "ansible.builtin.raw": "echo back"}])
    assert back.task("echo")["stdout"] == "back\n", back.output


# --- the Python guest: real modules through the plugin --------------------------------------------------------


@pytest.fixture(scope="module")
def python_vm(tmp_path_factory: pytest.TempPathFactory) -> t.Iterator[GuestVM]:
    image = build_python_guest(cache_dir())
    work = tmp_path_factory.mktemp("qga-python")
    disk = make_ext4_qcow2(work / "data.qcow2", size_mib=96)
    with GuestVM(image, [disk], work / "vm", memory_mib=512) as vm:
        vm.wait_ready(BOOT_TIMEOUT)
        assert guest_ok(vm, "python3 -c 'import sys; print(sys.version_info[:2])'") == "(3, 11)\n"
        yield vm


def test_command_copy_fetch_template_through_the_plugin(python_vm: GuestVM, tmp_path: Path) -> None:
    big = os.urandom(20 * 1024 * 1024)
    (tmp_path / "big.bin").write_bytes(big)
    (tmp_path / "motd.j2").write_text("Hello {{ who }} from {{ inventory_hostname }}\n")
    rendered = "Hello wörld from py\n".encode()
    fetched = tmp_path / "fetched" / "big.bin"
    host = qga_host(python_vm, ansible_python_interpreter="/usr/bin/python3", vmsnap_qga_timeout=180)
    run = play(
        tmp_path / "play",
        {"py": host},
        [
            {"name": "copy", "ansible.builtin.copy": {"src": str(tmp_path / "big.bin"), "dest": "/mnt/data/big.bin"}},
            {"name": "command", "ansible.builtin.command": {"argv": ["sha256sum", "/mnt/data/big.bin"]}},
            {
                "name": "fetch",
                "ansible.builtin.fetch": {"src": "/mnt/data/big.bin", "dest": str(fetched), "flat": True},
            },
            {
                "name": "template",
                "ansible.builtin.template": {"src": str(tmp_path / "motd.j2"), "dest": "/mnt/data/motd"},
                "vars": {"who": "wörld"},
            },
            {
                # Pipelining sends the module on stdin (input-data). A remote temporary folder that cannot be made
                # proves that nothing was copied: without pipelining this task could not run.
                "name": "pipelined",
                "ansible.builtin.command": {"argv": ["cat", "/mnt/data/motd"]},
                "vars": {"ansible_pipelining": True, "ansible_remote_tmp": "/etc/passwd/not-a-folder"},
            },
        ],
    )
    assert run.rc == 0, run.output

    copied = run.task("copy")
    assert copied["status"] == "ok" and copied["changed"], copied
    assert copied["checksum"] == hashlib.sha1(big).hexdigest()  # Ansible's own checksum is SHA-1
    assert guest_sha256(python_vm, "/mnt/data/big.bin") == sha256(big)

    command = run.task("command")
    assert command["rc"] == 0 and command["stdout"] == f"{sha256(big)}  /mnt/data/big.bin", command

    assert run.task("fetch")["status"] == "ok"
    assert sha256(fetched.read_bytes()) == sha256(big)

    template = run.task("template")
    assert template["status"] == "ok" and template["changed"], template
    assert guest_sha256(python_vm, "/mnt/data/motd") == sha256(rendered)

    pipelined = run.task("pipelined")
    assert pipelined["status"] == "ok", pipelined
    assert pipelined["stdout"] == rendered.decode().rstrip("\n")
