# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The runner against replayed qemu-img outputs (recorded from real runs, see fixtures/)."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import time

import pytest

from ansible_collections.vmsnap.qemu.plugins.module_utils import _qemu_img
from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import ImageInUseError, QemuImgError
from ansible_collections.vmsnap.qemu.plugins.module_utils._qemu_img import (
    DATA_RATE,
    DATA_TIMEOUT,
    METADATA_TIMEOUT,
    execute_argv,
    timeout_for,
)
from ansible_collections.vmsnap.qemu.plugins.module_utils._qemu_img import QemuImg as RealQemuImg


class Replay:
    """Stands in for the process seam: returns queued (rc, stdout, stderr) and records each argv."""

    def __init__(self, replies: list[tuple[int, str, str]]) -> None:
        self.replies = list(replies)
        self.calls: list[dict] = []

    def get_bin_path(self, name: str, required: bool = False) -> str:
        return "/usr/bin/" + name

    def __call__(self, args: list[str], timeout: float | None = None) -> tuple[int, str, str]:
        self.calls.append(dict(args=args, timeout=timeout))
        reply = self.replies.pop(0)
        if isinstance(reply, BaseException):
            raise reply
        return reply


def QemuImg(replay: Replay) -> RealQemuImg:  # noqa: N802 - reads like the class under test
    return RealQemuImg(replay, execute=replay)


def test_info_uses_argv_json_chain_and_c_locale(recorded) -> None:
    module = Replay([(0, json.dumps(recorded.json("info-plain-qcow2.json")), "")])
    info = QemuImg(module).info("/tmp/q/rec/plain.qcow2")
    call = module.calls[0]
    assert call["args"] == [
        "/usr/bin/qemu-img",
        "info",
        "--output=json",
        "--backing-chain",
        "--",
        "/tmp/q/rec/plain.qcow2",
    ]
    assert info.in_use is False


def test_locked_image_is_reread_with_force_share(recorded) -> None:
    module = Replay(
        [
            (1, "", recorded.text("stderr-info-locked.txt")),
            (0, json.dumps(recorded.json("info-plain-qcow2.json")), ""),
        ]
    )
    info = QemuImg(module).info("/tmp/q/run2.qcow2", backing_chain=False)
    assert info.in_use is True
    assert module.calls[1]["args"] == [
        "/usr/bin/qemu-img",
        "info",
        "--output=json",
        "--force-share",
        "--",
        "/tmp/q/run2.qcow2",
    ]


def test_write_lock_failure_becomes_in_use_error(recorded) -> None:
    module = Replay([(1, "", recorded.text("stderr-snapshot-create-locked.txt"))])
    with pytest.raises(ImageInUseError) as info:
        QemuImg(module).snapshot_create("/tmp/q/run2.qcow2", "s1")
    assert "in use" in info.value.msg and "qmp_live_snapshot" in info.value.msg
    assert info.value.details["cmd"] == ["/usr/bin/qemu-img", "snapshot", "-q", "-c", "s1", "--", "/tmp/q/run2.qcow2"]


def test_other_failures_carry_cmd_rc_stdout_stderr(recorded) -> None:
    stderr = recorded.text("stderr-snapshot-create-enospc.txt")
    module = Replay([(1, "", stderr)])
    with pytest.raises(QemuImgError) as info:
        QemuImg(module).snapshot_create("/d.qcow2", "s1")
    err = info.value
    assert err.rc == 1 and err.stderr == stderr and err.stdout == ""
    assert "No space left on device" in err.msg


def test_unparsable_json_is_an_error_not_an_empty_result() -> None:
    module = Replay([(0, "not json", "")])
    with pytest.raises(QemuImgError, match="Could not parse"):
        QemuImg(module).info("/x.qcow2")


def test_unexpected_json_shape_is_an_error() -> None:
    module = Replay([(0, "[]", "")])
    with pytest.raises(QemuImgError, match="Unexpected qemu-img info JSON"):
        QemuImg(module).info("/x.qcow2")


DEEP = "[" * 100000 + "]" * 100000


@pytest.mark.parametrize(
    "out", ["[]", "null", "5", '"x"', DEEP, "{"], ids=["list", "null", "number", "string", "deep", "cut"]
)
def test_check_output_that_is_not_an_object_is_an_error(out: str) -> None:
    with pytest.raises(QemuImgError, match="Could not parse the JSON output of qemu-img check for /a.qcow2"):
        QemuImg(Replay([(0, out, "")])).check("/a.qcow2")


def test_deeply_nested_json_is_an_error_not_a_recursion_error() -> None:
    with pytest.raises(QemuImgError, match="Could not parse the JSON output"):
        QemuImg(Replay([(0, DEEP, "")])).info("/x.qcow2")


@pytest.mark.parametrize(
    "out",
    [
        "{}",
        "[1]",
        '[{"start": 0, "present": true, "depth": 0}]',
        '[{"start": 0, "length": null, "present": true, "depth": 0}]',
        '[{"start": 0, "length": "5", "present": true, "depth": 0}]',
        '[{"start": 0, "length": -1, "present": true, "depth": 0}]',
    ],
)
def test_map_output_of_the_wrong_shape_is_an_error(out: str) -> None:
    with pytest.raises(QemuImgError, match="Unexpected qemu-img map output for /a.qcow2: an extent without a length"):
        QemuImg(Replay([(0, out, "")])).allocated_bytes("/a.qcow2")


def test_allocated_bytes_counts_the_layers_own_extents() -> None:
    out = json.dumps(
        [
            {"start": 0, "length": 65536, "depth": 0, "present": True, "zero": False, "data": True, "offset": 327680},
            {"start": 65536, "length": 65536, "depth": 1, "present": True, "zero": False, "data": True},
            {"start": 131072, "length": 131072, "depth": 0, "present": False, "zero": False, "data": False},
        ]
    )
    assert QemuImg(Replay([(0, out, "")])).allocated_bytes("/a.qcow2") == 65536


def test_check_keeps_rc_for_corrupt_and_leaks(recorded) -> None:
    clean = json.dumps(recorded.json("check-clean.json"))
    module = Replay([(0, clean, ""), (3, clean, ""), (63, "", "qemu-img: This image format does not support checks")])
    runner = QemuImg(module)
    assert runner.check("/a.qcow2")["rc"] == 0
    assert runner.check("/a.qcow2", force_share=True)["rc"] == 3
    assert "--force-share" in module.calls[1]["args"]
    with pytest.raises(QemuImgError, match="does not support checks"):
        runner.check("/a.raw")


@pytest.mark.parametrize(
    ("method", "flag"),
    [("snapshot_create", "-c"), ("snapshot_delete", "-d"), ("snapshot_apply", "-a")],
)
def test_snapshot_commands_pass_name_as_its_own_argument(method: str, flag: str) -> None:
    module = Replay([(0, "", "")])
    getattr(QemuImg(module), method)("/v/d.qcow2", "name; rm -rf / $(x)")
    assert module.calls[0]["args"] == [
        "/usr/bin/qemu-img",
        "snapshot",
        "-q",
        flag,
        "name; rm -rf / $(x)",
        "--",
        "/v/d.qcow2",
    ]


def test_real_process_seam_runs_argv_in_c_locale_without_shell(monkeypatch) -> None:
    monkeypatch.setenv("LANG", "de_DE.UTF-8")
    rc, out, err = execute_argv(["/bin/sh", "-c", 'echo "$LANG|$LC_ALL|$0"', "x; echo injected"])
    assert (rc, out, err) == (0, "C|C|x; echo injected\n", "")


def test_real_process_seam_reports_failures() -> None:
    rc, dummy, err = execute_argv(["/bin/sh", "-c", "echo oops >&2; exit 3"])
    assert rc == 3 and err == "oops\n"


def test_a_killed_qemu_img_is_reported_as_such() -> None:
    module = Replay([(-9, "", "")])
    with pytest.raises(QemuImgError, match="qemu-img was killed by signal 9"):
        QemuImg(module).commit("/v/top.qcow2", drop_top=True)


def test_the_locked_image_named_by_qemu_img_is_the_one_reported(recorded) -> None:
    # qemu-img create -b BACKING fails on the backing file's lock, not on the new overlay (the last argument).
    module = Replay([(1, "", recorded.text("stderr-snapshot-create-locked.txt"))])
    with pytest.raises(ImageInUseError) as info:
        QemuImg(module).create_overlay("/v/new.qcow2", "/tmp/q/run2.qcow2", "qcow2", "20G")
    assert info.value.msg.startswith("Image /tmp/q/run2.qcow2 is in use")


class BinModule:
    def get_bin_path(self, name: str, required: bool = False) -> str:
        return "/usr/bin/" + name


def test_every_call_has_a_time_limit_by_kind(tmp_path: pathlib.Path) -> None:
    image = tmp_path / "big.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "50G"], check=True)
    module = Replay([(0, "", "")] * 4)
    runner = QemuImg(module)
    runner.snapshot_create(str(image), "s1")
    runner.commit(str(image), drop_top=True)
    runner.convert_standalone(str(image), str(tmp_path / "new.qcow2"), compress=False, bitmaps=False)
    runner.run(["bitmap", "--add", "--", str(image), "b"])
    timeouts = [call["timeout"] for call in module.calls]
    # Metadata calls: fixed. Data and snapshot calls: the base plus the virtual size (50 GiB, more than the file)
    # at DATA_RATE.
    assert timeouts[3] == METADATA_TIMEOUT
    assert timeouts[0] == timeouts[1] == timeouts[2] == pytest.approx(DATA_TIMEOUT + 50 * 1024**3 / DATA_RATE)
    assert timeout_for(["compare", "--", "/nonexistent/a", "/nonexistent/b"]) == DATA_TIMEOUT


def test_snapshot_calls_and_json_layer_specs_are_sized_by_the_image(tmp_path: pathlib.Path) -> None:
    image = tmp_path / "big.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "50G"], check=True)
    sized = pytest.approx(DATA_TIMEOUT + 50 * 1024**3 / DATA_RATE)
    assert timeout_for(["snapshot", "-q", "-a", "s1", "--", str(image)]) == sized
    layer = "json:" + json.dumps({"driver": "qcow2", "file": {"driver": "file", "filename": str(image)}})
    assert timeout_for(["map", "--output=json", "--", layer]) == sized
    assert timeout_for(["map", "--output=json", "--", "json:{not json"]) == DATA_TIMEOUT
    link = tmp_path / "disk.qcow2"
    link.symlink_to(image)
    assert timeout_for(["commit", "-q", "--", str(link)]) == sized


def test_sizing_never_blocks_on_a_fifo(tmp_path: pathlib.Path) -> None:
    fifo = tmp_path / "target.qcow2"
    os.mkfifo(fifo)
    started = time.monotonic()
    assert timeout_for(["convert", "-O", "qcow2", "--", str(fifo)]) == DATA_TIMEOUT
    assert time.monotonic() - started < 5


def test_a_timeout_is_an_error_naming_command_path_and_seconds() -> None:
    cmd = ["/usr/bin/qemu-img", "commit", "-q", "-f", "qcow2", "--", "/nfs/top.qcow2"]
    module = Replay([subprocess.TimeoutExpired(cmd, 12.0)])
    with pytest.raises(QemuImgError) as info:
        QemuImg(module).commit("/nfs/top.qcow2", drop_top=False)
    assert info.value.msg == (
        f"{' '.join(cmd)} did not finish within {DATA_TIMEOUT:.0f} s and was killed; /nfs/top.qcow2 may be on a hung "
        "file system (an NFS or other network server that stopped answering). Nothing was reported as done: check "
        "the storage, then run the task again."
    )
    assert info.value.rc == -9


def test_a_qemu_img_that_cannot_start_is_an_error() -> None:
    module = Replay([FileNotFoundError(2, "No such file or directory")])
    with pytest.raises(QemuImgError, match="Cannot run /usr/bin/qemu-img snapshot"):
        QemuImg(module).snapshot_delete("/v/d.qcow2", "s1")


def test_a_real_hang_is_killed_after_the_limit(tmp_path: pathlib.Path) -> None:
    # qemu-img info on a FIFO blocks in open() like a read from a dead NFS server: a real hang, not a fake.
    fifo = tmp_path / "hung.qcow2"
    os.mkfifo(fifo)
    runner = RealQemuImg(BinModule(), metadata_timeout=1.0)
    runner.binary = "qemu-img"
    started = time.monotonic()
    with pytest.raises(QemuImgError) as info:
        runner.info(str(fifo), backing_chain=False)
    assert time.monotonic() - started < 10
    assert "did not finish within 1 s and was killed" in info.value.msg
    assert f"{fifo} may be on a hung file system" in info.value.msg
    assert "Nothing was reported as done" in info.value.msg


def test_a_timeout_returns_even_when_a_child_of_the_process_holds_its_output(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stand-in whose child keeps the output pipes open: the wait after the kill is bounded.
    monkeypatch.setattr(_qemu_img, "_REAP_SECONDS", 0.5)
    pid_file = tmp_path / "child.pid"
    started = time.monotonic()
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            execute_argv(["/bin/sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait"], timeout=0.5)
        assert time.monotonic() - started < 5
    finally:
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_qemu_img_stays_in_the_tasks_process_group() -> None:
    # Whoever kills a task's process group (a killed run; the kill trials wait for the group to empty) kills its
    # qemu-img too, instead of leaving an orphan that holds the image's locks.
    rc, out, dummy = execute_argv(["/bin/sh", "-c", "cut -d' ' -f5 /proc/$$/stat"], timeout=10)
    assert (rc, int(out)) == (0, os.getpgrp())
