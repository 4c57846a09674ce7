# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The runner against replayed qemu-img outputs (recorded from real runs, see fixtures/)."""

from __future__ import annotations

import json

import pytest

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import ImageInUseError, QemuImgError
from ansible_collections.vmsnap.qemu.plugins.module_utils._qemu_img import QemuImg as RealQemuImg
from ansible_collections.vmsnap.qemu.plugins.module_utils._qemu_img import execute_argv


class Replay:
    """Stands in for the process seam: returns queued (rc, stdout, stderr) and records each argv."""

    def __init__(self, replies: list[tuple[int, str, str]]) -> None:
        self.replies = list(replies)
        self.calls: list[dict] = []

    def get_bin_path(self, name: str, required: bool = False) -> str:
        return "/usr/bin/" + name

    def __call__(self, args: list[str]) -> tuple[int, str, str]:
        self.calls.append(dict(args=args))
        return self.replies.pop(0)


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
