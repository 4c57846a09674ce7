# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""Helpers of the qcow2_backup tests: the module's main() in this process (real AnsibleModule, qemu-img, QEMU),
qemu-io patterns, byte-identical tree checks, and a VM without a guest OS whose disks are written through HMP."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
import typing as t
from pathlib import Path

from conftest import REPO

sys.path.insert(0, os.environ.get("ANSIBLE_COLLECTIONS_PATH", str(REPO / "build" / "src")).split(os.pathsep)[0])
from ansible.module_utils.common import warnings as ansible_warnings  # noqa: E402
from ansible.module_utils.testing import patch_module_args  # noqa: E402

from ansible_collections.vmsnap.qemu.plugins.module_utils._qmp import QmpClient  # noqa: E402
from ansible_collections.vmsnap.qemu.plugins.modules import qcow2_backup  # noqa: E402

MIB = 1024 * 1024
MODULE_FILE = qcow2_backup.__file__
COLLECTIONS_ROOT = str(Path(MODULE_FILE).resolve().parents[5])


def run(check: bool = False, diff: bool = False, **args: t.Any) -> dict[str, t.Any]:
    """One task of qcow2_backup in this process; the result (failed ones too) plus 'warnings'."""
    params = dict(args, _ansible_check_mode=check, _ansible_diff=diff)
    for name in ("_global_warnings", "_global_deprecations"):
        getattr(ansible_warnings, name).clear()
    out = io.StringIO()
    with patch_module_args(params), contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        qcow2_backup.main()
    result = t.cast("dict[str, t.Any]", json.loads(out.getvalue()))
    result["failed"] = bool(result.get("failed"))
    # ansible-core 2.19 returns warnings as WarningSummary dicts, older releases as strings.
    result["warnings"] = [
        w["event"]["msg"] if isinstance(w, dict) and "event" in w else str(w) for w in result.get("warnings") or []
    ]
    return result


def ok(**args: t.Any) -> dict[str, t.Any]:
    result = run(**args)
    assert not result["failed"], result
    return result


def module_argv(args: dict[str, t.Any], folder: Path) -> list[str]:
    """Run the module as its own process (to kill it): python MODULE ARGS_FILE."""
    args_file = folder / f"args-{time.monotonic_ns()}.json"
    args_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": args}))
    return [sys.executable, MODULE_FILE, str(args_file)]


def module_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (COLLECTIONS_ROOT, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path)


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], check=True, capture_output=True, text=True).stdout


def info(image: Path | str) -> dict[str, t.Any]:
    return t.cast("dict[str, t.Any]", json.loads(qemu_img("info", "-U", "--output=json", str(image))))


def bitmaps(image: Path | str) -> dict[str, list[str]]:
    data = info(image).get("format-specific", {}).get("data", {})
    return {bitmap["name"]: bitmap["flags"] for bitmap in data.get("bitmaps") or []}


def new_image(path: Path, size: str = "16M") -> Path:
    qemu_img("create", "-q", "-f", "qcow2", str(path), size)
    return path


def write(image: Path | str, pattern: int, offset: int, length: int = MIB) -> None:
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern:#x} {offset} {length}", str(image)],
        check=True,
        capture_output=True,
    )


def reads(image: Path | str, pattern: int, offset: int, length: int = MIB) -> bool:
    """Whether the guest sees pattern there (qemu-io read -P; a mismatch prints 'Pattern verification failed')."""
    proc = subprocess.run(
        ["qemu-io", "-U", "-r", "-c", f"read -P {pattern:#x} {offset} {length}", str(image)],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.returncode == 0 and "Pattern verification failed" not in proc.stdout


def tree(*paths: Path) -> dict[str, tuple[int, str]]:
    """Every file under the paths (or the files themselves) with mode and sha256: equal means nothing changed."""
    seen: dict[str, tuple[int, str]] = {}
    for path in paths:
        entries = [path] if path.is_file() else sorted(p for p in path.rglob("*")) if path.exists() else []
        for entry in entries:
            st = entry.lstat()
            digest = hashlib.sha256(entry.read_bytes()).hexdigest() if entry.is_file() else ""
            seen[str(entry)] = (st.st_mode, digest)
    return seen


def first_data_offset(path: Path) -> int:
    """Host offset of the first data cluster of a qcow2 file (to damage data, not metadata)."""
    spec = "json:" + json.dumps({"driver": "qcow2", "file": {"driver": "file", "filename": str(path)}, "backing": None})
    extents = json.loads(qemu_img("map", "--output=json", spec))
    return next(int(ext["offset"]) for ext in extents if ext.get("data") and "offset" in ext)


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except FileNotFoundError:
        return True


class NoOsVm:
    """QEMU under TCG without a guest OS on our disks; writes are HMP qemu-io writes (what a guest would do)."""

    def __init__(self, work: Path, disks: list[Path]) -> None:
        self.work = work
        self.disks = disks
        self.sock = work / "vm.qmp"
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        argv = ["qemu-system-x86_64", "-machine", "pc", "-accel", "tcg", "-display", "none", "-nodefaults"]
        argv += ["-m", "32", "-qmp", f"unix:{self.sock},server=on,wait=off"]
        for number, disk in enumerate(self.disks):
            argv += ["-drive", f"file={disk},format=qcow2,if=virtio,id=drive{number},node-name=disk{number}"]
        return argv

    def start(self) -> NoOsVm:
        with contextlib.suppress(FileNotFoundError):
            self.sock.unlink()
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                with self.qmp() as qmp:
                    qmp.execute("query-status")
                return self
            except Exception:  # noqa: BLE001 - not listening yet
                assert self.proc.poll() is None, "QEMU exited at start"
                assert time.monotonic() < deadline, "QEMU did not open its QMP socket"
                time.sleep(0.05)

    def qmp(self) -> QmpClient:
        return QmpClient(str(self.sock), 5.0, 60.0)

    def hmp_write(self, drive: str, pattern: int, offset: int, length: int = MIB) -> None:
        with self.qmp() as qmp:
            out = qmp.execute(
                "human-monitor-command", {"command-line": f'qemu-io {drive} "write -P {pattern:#x} {offset} {length}"'}
            )
        assert "error" not in str(out).lower(), out

    def quit(self) -> None:
        assert self.proc is not None
        with self.qmp() as qmp, contextlib.suppress(Exception):
            qmp.execute("quit")
        self.proc.wait(30)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.proc = None
