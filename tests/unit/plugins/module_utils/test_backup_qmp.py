# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The backup engine's pure parts on recorded QEMU 7.2 replies, and its command order against a fake QEMU on a real
Unix socket (the behaviour itself is tested on real QEMU in tests/vm/test_backup_engine.py)."""

from __future__ import annotations

import os
import pathlib
import time
import typing as t

import pytest

from ansible_collections.vmsnap.qemu.plugins.module_utils._backup_qmp import (
    BackupError,
    DiskJob,
    assign_job_ids,
    backing_reference,
    bitmaps_of,
    cancel_stale_jobs,
    check_jobs,
    first_cause,
    job_failure,
    parse_bitmaps,
    remove_bitmap,
    run_backup_jobs,
    storage_daemon,
    target_blockdev,
    target_node_name,
    transaction_actions,
)
from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._qemu_img import QemuImg
from ansible_collections.vmsnap.qemu.plugins.module_utils._qmp import QmpClient
from ansible_collections.vmsnap.qemu.tests.unit.plugins.module_utils.qmp_fakes import FakeQmp, Message, qmp_error, reply

MIB = 1024 * 1024
BM0 = "vmsnap-backup-disk0-00000001"
BM1 = "vmsnap-backup-disk1-00000001"


def full(node: str, target: str, bitmap: str | None) -> DiskJob:
    return DiskJob(node=node, target=target, virtual_size=16 * MIB, sync="full", bitmap=bitmap)


def inc(node: str, target: str, bitmap: str, backing: str) -> DiskJob:
    return DiskJob(node=node, target=target, virtual_size=16 * MIB, sync="bitmap", bitmap=bitmap, backing=backing)


# ---- pure parts ---------------------------------------------------------------------------------------------------


def test_job_ids_come_from_the_set_and_never_repeat() -> None:
    jobs = [
        full("disk0", "/b/a", BM0),
        full("#block123", "/b/b", None),
        full("disk1", "/b/c", BM0),
        full("x", "/b/d", ""),
    ]
    jobs[3].job_id = "mine"
    assign_job_ids(jobs)
    assert [job.job_id for job in jobs] == [
        "vmsnap-backup-disk0",
        "vmsnap-backup-_block123",
        "vmsnap-backup-disk0-2",
        "mine",
    ]
    twins = [full("a", "/b/a", None), full("b", "/b/b", None)]
    twins[0].job_id = twins[1].job_id = "same"
    with pytest.raises(BackupError, match="same job id"):
        assign_job_ids(twins)


def test_target_node_names_are_fixed_per_job_and_fit_qemu() -> None:
    name = target_node_name("vmsnap-backup-" + "a-very-long-set-name" * 5)
    assert (
        len(name) <= 31
        and name[0].isalpha()
        and name == target_node_name("vmsnap-backup-" + "a-very-long-set-name" * 5)
    )
    assert target_node_name("vmsnap-backup-a") != target_node_name("vmsnap-backup-b")


def test_backing_is_named_relative_within_one_folder() -> None:
    assert backing_reference("/set/.tmp-2.inc.qcow2", "/set/1.full.qcow2") == "1.full.qcow2"
    assert backing_reference("/set/.tmp-2.inc.qcow2", "/other/1.full.qcow2") == "/other/1.full.qcow2"


@pytest.mark.parametrize(
    ("jobs", "message"),
    [
        ([], "No disk"),
        ([full("a", "/b/x", None), full("b", "/b/x", None)], "same target"),
        ([full("a", "/b/x", None), full("a", "/b/y", None)], "same node"),
        ([DiskJob("a", "/b/x", 1, "top", None)], "Unknown backup sync mode 'top'"),
        ([full("a", "rel.qcow2", None)], "not an absolute path"),
        ([DiskJob("a", "/b/x", 0, "full", None)], "virtual size of node a is unknown"),
        ([DiskJob("a", "/b/x", 1, "bitmap", BM0)], "needs a bitmap and the previous backup"),
        ([full("a", "/b/x", "other-tool")], "'other-tool' is not a bitmap name of vmsnap.qemu"),
    ],
)
def test_check_jobs_refuses(jobs: list[DiskJob], message: str) -> None:
    with pytest.raises(BackupError, match=message):
        check_jobs(jobs)


def test_transaction_of_a_full_backup_adds_its_bitmap_and_is_not_grouped() -> None:
    jobs = [full("disk0", "/b/0", BM0), full("disk1", "/b/1", BM1)]
    jobs[1].compress, jobs[1].speed = True, 1000
    assign_job_ids(jobs)
    actions, properties = transaction_actions(jobs)
    # QEMU refuses completion-mode grouped next to block-dirty-bitmap-add (7.2: "does not support Transaction
    # property completion-mode = grouped"); the engine finalizes all or none itself.
    assert properties == {}
    assert actions == [
        {"type": "block-dirty-bitmap-add", "data": {"node": "disk0", "name": BM0, "persistent": True}},
        {"type": "block-dirty-bitmap-add", "data": {"node": "disk1", "name": BM1, "persistent": True}},
        {
            "type": "blockdev-backup",
            "data": {
                "job-id": "vmsnap-backup-disk0",
                "device": "disk0",
                "target": target_node_name("vmsnap-backup-disk0"),
                "sync": "full",
                "auto-finalize": False,
                "auto-dismiss": False,
            },
        },
        {
            "type": "blockdev-backup",
            "data": {
                "job-id": "vmsnap-backup-disk1",
                "device": "disk1",
                "target": target_node_name("vmsnap-backup-disk1"),
                "sync": "full",
                "auto-finalize": False,
                "auto-dismiss": False,
                "compress": True,
                "speed": 1000,
            },
        },
    ]


def test_transaction_of_incrementals_is_grouped() -> None:
    jobs = [inc("disk0", "/b/0", BM0, "/b/p0"), inc("disk1", "/b/1", BM1, "/b/p1")]
    assign_job_ids(jobs)
    actions, properties = transaction_actions(jobs)
    assert properties == {"completion-mode": "grouped"}
    assert [a["data"]["bitmap"] for a in actions] == [BM0, BM1]
    assert {a["data"]["bitmap-mode"] for a in actions} == {"on-success"}
    single, properties = transaction_actions(jobs[:1])
    assert properties == {} and single == actions[:1]
    mixed = [inc("disk0", "/b/0", BM0, "/b/p0"), full("disk1", "/b/1", BM1)]
    assign_job_ids(mixed)
    assert transaction_actions(mixed)[1] == {}


def test_target_is_opened_without_its_backing_file() -> None:
    job = inc("disk0", "/b/.tmp-1.inc.qcow2", BM0, "/b/0.full.qcow2")
    job.job_id = "vmsnap-backup-disk0"
    assert target_blockdev(job) == {
        "driver": "qcow2",
        "node-name": target_node_name("vmsnap-backup-disk0"),
        "file": {"driver": "file", "filename": "/b/.tmp-1.inc.qcow2"},
        "backing": None,
    }


def test_parse_bitmaps_of_a_recorded_node(recorded: t.Any) -> None:
    doc = recorded.json("backup-qmp.json")
    bitmaps = parse_bitmaps(doc["nodes_idle"], "disk0")
    assert sorted(bitmaps) == sorted(
        ["other-tool", BM0, "vmsnap-backup-disk0-00000002", "vmsnap-backup-disk0-0badc0de"]
    )
    recording = bitmaps[BM0]
    assert (recording.count, recording.recording, recording.persistent, recording.busy) == (MIB, True, True, False)
    assert not recording.inconsistent and recording.granularity == 65536
    assert not bitmaps["vmsnap-backup-disk0-00000002"].recording
    assert bitmaps["vmsnap-backup-disk0-0badc0de"].inconsistent  # its writer was killed
    assert not bitmaps["other-tool"].persistent
    assert parse_bitmaps(doc["nodes_idle"], "disk1") == {}
    busy = parse_bitmaps(doc["nodes_busy"], "disk0")  # a job's anonymous bitmaps are left out
    assert sorted(busy) == sorted(bitmaps) and busy[BM0].busy
    with pytest.raises(BackupError, match="no block node named nope"):
        parse_bitmaps(doc["nodes_idle"], "nope")


def test_job_failures_from_recorded_jobs(recorded: t.Any) -> None:
    doc = recorded.json("backup-qmp.json")
    job = full("disk0", "/b/x", None)
    assert job_failure(job, doc["jobs_pending"][0]) is None
    assert job_failure(job, {"id": "x", "status": "running"}) is None
    assert job_failure(job, doc["jobs_cancelled"][0]) == "Operation canceled"
    assert job_failure(job, None) == "the job disappeared (someone else dismissed it?)"
    assert (
        job_failure(job, {"id": "x", "status": "concluded"})
        == "the job ended without reaching pending (status concluded)"
    )
    failures = {entry["id"]: entry["error"] for entry in reversed(doc["jobs_failed"])}
    assert list(failures) == ["vmsnap-backup-disk0", "vmsnap-backup-disk1"]
    assert first_cause(failures) == ("vmsnap-backup-disk1", "Input/output error")  # not the sibling QEMU cancelled
    assert first_cause({"a": "Operation canceled"}) == ("a", "Operation canceled")


# ---- the command order against a fake QEMU ------------------------------------------------------------------------


class FakeQemu:
    """Enough of QEMU 7.2's block layer for the engine: nodes with bitmaps, jobs, transactions.

    outcome: what the jobs do once started: "pending" (succeed), "running" (never finish), or "fail:<job id>" (that
    job fails with EIO; in a grouped transaction QEMU cancels the others, otherwise they reach pending).
    """

    def __init__(self, outcome: str = "pending") -> None:
        self.outcome = outcome
        self.nodes: dict[str, dict[str, dict[str, t.Any]]] = {"disk0": {}, "disk1": {}}
        self.jobs: dict[str, dict[str, t.Any]] = {}
        self.job_bitmap: dict[str, tuple[str, str]] = {}
        self.grouped: set[str] = set()
        self.drop_on: str | None = None
        self.refuse_add = ""

    def bitmap(self, node: str, name: str, count: int = 0, **extra: t.Any) -> None:
        self.nodes[node][name] = {"name": name, "recording": True, "persistent": True, "busy": False, "count": count}
        self.nodes[node][name].update(extra)

    def jobs_seen(self) -> str:
        return ",".join(f"{job_id}:{job['status']}" for job_id, job in self.jobs.items())

    def __call__(self, message: Message, server: FakeQmp) -> list[Message] | None:
        command, args = message["execute"], message.get("arguments", {})
        if command == self.drop_on:
            return None
        handler = getattr(self, "do_" + command.replace("-", "_"))
        try:
            return [reply(message, handler(args))]
        except ValueError as exc:
            return [qmp_error(message, str(exc))]

    def do_query_named_block_nodes(self, args: dict[str, t.Any]) -> list[dict[str, t.Any]]:
        return [{"node-name": name, "dirty-bitmaps": list(bitmaps.values())} for name, bitmaps in self.nodes.items()]

    def do_query_jobs(self, args: dict[str, t.Any]) -> list[dict[str, t.Any]]:
        return [dict(job) for job in self.jobs.values()]

    def do_blockdev_add(self, args: dict[str, t.Any]) -> dict[str, t.Any]:
        assert os.path.exists(args["file"]["filename"])
        if self.refuse_add:
            raise ValueError(self.refuse_add)
        self.nodes[args["node-name"]] = {}
        return {}

    def do_blockdev_del(self, args: dict[str, t.Any]) -> dict[str, t.Any]:
        if any(job["target"] == args["node-name"] for job in self.jobs.values()):
            raise ValueError(f"Node '{args['node-name']}' is busy: block device is in use by block job: backup")
        del self.nodes[args["node-name"]]
        return {}

    def do_transaction(self, args: dict[str, t.Any]) -> dict[str, t.Any]:
        grouped = args.get("properties", {}).get("completion-mode") == "grouped"
        types = {action["type"] for action in args["actions"]}
        if grouped and types != {"blockdev-backup"}:
            raise ValueError("Action 'block-dirty-bitmap-add' does not support Transaction property completion-mode")
        for action in args["actions"]:
            data = action["data"]
            if action["type"] == "block-dirty-bitmap-add":
                self.bitmap(data["node"], data["name"])
                continue
            job_id = data["job-id"]
            self.jobs[job_id] = {"id": job_id, "type": "backup", "status": "running", "target": data["target"]}
            self.jobs[job_id].update({"current-progress": 0, "total-progress": MIB})
            if grouped:
                self.grouped.add(job_id)
            if data.get("bitmap"):
                self.job_bitmap[job_id] = (data["device"], data["bitmap"])
                self.nodes[data["device"]][data["bitmap"]]["busy"] = True
        failing = self.outcome[5:] if self.outcome.startswith("fail:") else None
        for job_id, job in self.jobs.items():
            if failing == job_id:
                job.update(status="concluded", error="Input/output error")
            elif failing and job_id in self.grouped:
                job.update(status="concluded", error="Operation canceled")
            elif self.outcome != "running":
                job.update(status="pending", **{"current-progress": MIB})
        for job_id, job in self.jobs.items():
            if job["status"] == "concluded":
                self._release(job_id, success=False)
        return {}

    def _release(self, job_id: str, success: bool) -> None:
        if job_id in self.job_bitmap:
            node, name = self.job_bitmap.pop(job_id)
            self.nodes[node][name]["busy"] = False
            if success:
                self.nodes[node][name]["count"] = 0

    def do_job_finalize(self, args: dict[str, t.Any]) -> dict[str, t.Any]:
        group = self.grouped if args["id"] in self.grouped else {args["id"]}
        for job_id in group:
            if self.jobs[job_id]["status"] != "pending":
                raise ValueError(f"Job '{job_id}' in state '{self.jobs[job_id]['status']}' cannot accept 'finalize'")
            self.jobs[job_id]["status"] = "concluded"
            self._release(job_id, success=True)
        return {}

    def do_job_cancel(self, args: dict[str, t.Any]) -> dict[str, t.Any]:
        job = self.jobs[args["id"]]
        if job["status"] == "concluded":
            raise ValueError(f"Job '{args['id']}' in state 'concluded' cannot accept command verb 'cancel'")
        job.update(status="concluded", error="Operation canceled")
        self._release(args["id"], success=False)
        return {}

    def do_job_dismiss(self, args: dict[str, t.Any]) -> dict[str, t.Any]:
        if args["id"] not in self.jobs or self.jobs[args["id"]]["status"] != "concluded":
            raise ValueError(f"Job '{args['id']}' cannot accept command verb 'dismiss'")
        del self.jobs[args["id"]]
        return {}

    def do_block_dirty_bitmap_add(self, args: dict[str, t.Any]) -> dict[str, t.Any]:
        self.bitmap(args["node"], args["name"])
        return {}

    def do_block_dirty_bitmap_remove(self, args: dict[str, t.Any]) -> dict[str, t.Any]:
        del self.nodes[args["node"]][args["name"]]
        return {}


class Binaries:
    def get_bin_path(self, name: str, required: bool = False) -> str:
        return f"/usr/bin/{name}"


class FakeQemuImg:
    """qemu-img create, recorded; it writes the file like the real one would."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.fail = fail

    def __call__(self, cmd: list[str], timeout: float | None = None) -> tuple[int, str, str]:
        self.calls.append(cmd)
        if self.fail:
            return 1, "", "qemu-img: Could not open backing file: No such file"
        pathlib.Path(cmd[-2]).write_bytes(b"QFI\xfb")
        return 0, "", ""


@pytest.fixture
def qemu(serve: t.Any) -> t.Callable[..., tuple[FakeQemu, FakeQmp, QmpClient]]:
    clients: list[QmpClient] = []

    def start(outcome: str = "pending") -> tuple[FakeQemu, FakeQmp, QmpClient]:
        fake = FakeQemu(outcome)
        server = serve(fake)
        client = QmpClient(server.path, 2.0, 5.0)
        client.connect()
        clients.append(client)
        return fake, server, client

    yield start
    for client in clients:
        client.close()


@pytest.fixture
def folder(tmp_path: pathlib.Path) -> pathlib.Path:
    """The backup set's folder (the fake QMP socket lives beside it)."""
    (tmp_path / "set").mkdir()
    return tmp_path / "set"


def qemu_img(fail: bool = False) -> tuple[QemuImg, list[list[str]]]:
    execute = FakeQemuImg(fail)
    return QemuImg(t.cast(t.Any, Binaries()), execute=execute), execute.calls


def test_full_backup_command_order(qemu: t.Any, folder: pathlib.Path) -> None:
    fake, server, client = qemu()
    runner, calls = qemu_img()
    target = str(folder / ".tmp-1.full.qcow2")
    events: list[str] = []
    results = run_backup_jobs(client, runner, [full("disk0", target, BM0)], 5, lambda: events.append(fake.jobs_seen()))
    node = target_node_name("vmsnap-backup-disk0")
    # qemu-img writes the file the engine created exclusively, through its fd (never a name planted meanwhile)
    assert len(calls) == 1 and calls[0][:6] == ["/usr/bin/qemu-img", "create", "-q", "-f", "qcow2", "--"]
    assert calls[0][6].startswith(f"/proc/{os.getpid()}/fd/") and calls[0][7:] == [str(16 * MIB)]
    assert oct(os.stat(target).st_mode & 0o777) == "0o600"
    assert [c for c in server.commands() if not c.startswith("query")] == [
        "qmp_capabilities",
        "blockdev-add",
        "transaction",
        "job-finalize",
        "job-dismiss",
        "blockdev-del",
    ]
    assert server.sent("blockdev-del") == [("blockdev-del", {"node-name": node})]
    assert [(r.job.job_id, r.bytes_copied) for r in results] == [("vmsnap-backup-disk0", MIB)]
    assert events == ["vmsnap-backup-disk0:pending"]  # before_finalize ran with the job pending
    assert fake.jobs == {} and node not in fake.nodes and BM0 in fake.nodes["disk0"]


def test_grouped_incrementals_finalize_once_and_clear_the_bitmaps(qemu: t.Any, folder: pathlib.Path) -> None:
    fake, server, client = qemu()
    fake.bitmap("disk0", BM0, MIB)
    fake.bitmap("disk1", BM1, 2 * MIB)
    runner, calls = qemu_img()
    jobs = [
        inc(f"disk{i}", str(folder / f".tmp-{i}.inc.qcow2"), bm, str(folder / f"{i}.full.qcow2"))
        for i, bm in enumerate([BM0, BM1])
    ]
    run_backup_jobs(client, runner, jobs, 5, lambda: None)
    assert calls[0][5:9] == ["-b", "0.full.qcow2", "-F", "qcow2"]
    [(dummy, transaction)] = server.sent("transaction")
    assert transaction["properties"] == {"completion-mode": "grouped"}
    assert server.sent("job-finalize") == [("job-finalize", {"id": "vmsnap-backup-disk0"})]  # one finalizes the group
    assert [fake.nodes[f"disk{i}"][bm]["count"] for i, bm in enumerate([BM0, BM1])] == [0, 0]
    assert fake.jobs == {}


def test_a_failing_job_cancels_the_others_and_removes_what_was_made(qemu: t.Any, folder: pathlib.Path) -> None:
    fake, server, client = qemu("fail:vmsnap-backup-disk1")
    fake.bitmap("disk0", "vmsnap-backup-disk0-0000000f", 5)
    runner, dummy = qemu_img()
    jobs = [full(f"disk{i}", str(folder / f".tmp-{i}.qcow2"), bm) for i, bm in enumerate([BM0, BM1])]
    with pytest.raises(
        BackupError,
        match=r"backup of node disk1 \(vmsnap-backup-disk1\) failed: Input/output error\. "
        "Every job of this backup was cancelled",
    ) as caught:
        run_backup_jobs(client, runner, jobs, 5, lambda: pytest.fail("finalized"))
    assert caught.value.details["node"] == "disk1"
    # individual transaction (it adds bitmaps): QEMU left disk0's job pending, the engine cancels it
    assert server.sent("job-cancel") == [("job-cancel", {"id": "vmsnap-backup-disk0"})]
    assert [a["node"] for c, a in server.sent("block-dirty-bitmap-remove")] == ["disk0", "disk1"]
    assert fake.nodes == {
        "disk0": {"vmsnap-backup-disk0-0000000f": fake.nodes["disk0"]["vmsnap-backup-disk0-0000000f"]},
        "disk1": {},
    }
    assert fake.jobs == {} and list(folder.iterdir()) == []
    assert "job-finalize" not in server.commands()


def test_a_grouped_failure_is_cancelled_by_qemu_and_keeps_the_bitmaps(qemu: t.Any, folder: pathlib.Path) -> None:
    fake, server, client = qemu("fail:vmsnap-backup-disk0")
    fake.bitmap("disk0", BM0, MIB)
    fake.bitmap("disk1", BM1, MIB)
    runner, dummy = qemu_img()
    jobs = [inc(f"disk{i}", str(folder / f".tmp-{i}.qcow2"), bm, str(folder / "p")) for i, bm in enumerate([BM0, BM1])]
    with pytest.raises(BackupError, match=r"node disk0 \(vmsnap-backup-disk0\) failed: Input/output error"):
        run_backup_jobs(client, runner, jobs, 5, lambda: pytest.fail("finalized"))
    assert server.sent("job-cancel") == [] and server.sent("block-dirty-bitmap-remove") == []
    assert [(b["count"], b["busy"]) for n in ("disk0", "disk1") for b in fake.nodes[n].values()] == [(MIB, False)] * 2
    assert list(folder.iterdir()) == []


def test_before_finalize_failing_cancels_and_raises_its_own_error(qemu: t.Any, folder: pathlib.Path) -> None:
    fake, server, client = qemu()
    fake.bitmap("disk0", BM0, MIB)
    runner, dummy = qemu_img()

    def index_write_fails() -> None:
        raise VmsnapError("cannot write the index")

    with pytest.raises(VmsnapError, match="^cannot write the index$") as caught:
        run_backup_jobs(client, runner, [inc("disk0", str(folder / ".tmp"), BM0, "/p")], 5, index_write_fails)
    assert not isinstance(caught.value, BackupError)
    assert server.sent("job-cancel") == [("job-cancel", {"id": "vmsnap-backup-disk0"})]
    assert fake.nodes["disk0"][BM0]["count"] == MIB and fake.jobs == {} and list(folder.iterdir()) == []


def test_timeout_cancels(qemu: t.Any, folder: pathlib.Path) -> None:
    fake, server, client = qemu("running")
    runner, dummy = qemu_img()
    with pytest.raises(
        BackupError, match=r"backup of node disk0 \(vmsnap-backup-disk0\) timed out after 0.2 s"
    ) as caught:
        run_backup_jobs(client, runner, [full("disk0", str(folder / ".tmp"), BM0)], 0.2, list)
    assert caught.value.details["timed_out"] is True
    assert server.sent("job-cancel") == [("job-cancel", {"id": "vmsnap-backup-disk0"})]
    assert BM0 not in fake.nodes["disk0"] and list(folder.iterdir()) == []


def test_refusals_before_anything_is_made(qemu: t.Any, folder: pathlib.Path) -> None:
    fake, server, client = qemu()
    runner, calls = qemu_img()
    fake.bitmap("disk0", BM0, MIB, inconsistent=True, recording=False)
    fake.bitmap("disk1", BM1)
    fake.jobs["vmsnap-backup-x"] = {"id": "vmsnap-backup-x", "status": "pending", "target": "t"}
    cases = [
        (inc("disk0", str(folder / "a"), BM0, "/p"), "bitmap vmsnap-backup-disk0-00000001 is inconsistent"),
        (inc("disk0", str(folder / "a"), "vmsnap-backup-disk0-00000009", "/p"), "does not exist"),
        (full("disk1", str(folder / "a"), BM1), "already exists on disk1; a full backup starts a new one"),
        (full("disk1", str(folder / "a"), "vmsnap-backup-x-00000001"), "job vmsnap-backup-x already exists"),
    ]
    for job, message in cases:
        with pytest.raises(BackupError, match=message):
            run_backup_jobs(client, runner, [job], 5, list)
    fake.nodes[target_node_name("vmsnap-backup-y")] = {}
    with pytest.raises(BackupError, match="target node .* is still open"):
        run_backup_jobs(client, runner, [full("disk1", str(folder / "a"), "vmsnap-backup-y-00000001")], 5, list)
    assert calls == [] and list(folder.iterdir()) == []
    assert set(server.commands()) == {"qmp_capabilities", "query-named-block-nodes", "query-jobs"}


def test_a_failing_create_or_open_removes_the_files(qemu: t.Any, folder: pathlib.Path) -> None:
    fake, server, client = qemu()
    runner, dummy = qemu_img(fail=True)
    with pytest.raises(BackupError, match="Cannot create the backup file .*Could not open backing file"):
        run_backup_jobs(client, runner, [full("disk0", str(folder / "a"), BM0)], 5, list)
    assert list(folder.iterdir()) == []
    runner, dummy = qemu_img()
    fake.nodes["disk9"] = {}
    fake.refuse_add = "Could not open: Permission denied"
    with pytest.raises(BackupError, match="QEMU cannot open the backup file .* of node disk9.*Permission denied"):
        run_backup_jobs(client, runner, [full("disk9", str(folder / "a"), BM0)], 5, list)
    assert list(folder.iterdir()) == [] and "transaction" not in server.commands()


def test_a_lost_connection_is_a_backup_error_and_the_files_go(qemu: t.Any, folder: pathlib.Path) -> None:
    fake, server, client = qemu()
    fake.drop_on = "transaction"
    runner, dummy = qemu_img()
    with pytest.raises(BackupError, match="The backup of disk0 failed: QEMU closed the connection") as caught:
        run_backup_jobs(client, runner, [full("disk0", str(folder / "a"), BM0)], 5, list)
    assert "QEMU could not be told to clean up" in caught.value.msg
    assert caught.value.details["cleanup_problems"]
    assert list(folder.iterdir()) == []


def test_cancel_stale_jobs(qemu: t.Any) -> None:
    fake, server, client = qemu()
    fake.bitmap("disk0", BM0, MIB, busy=True)
    fake.jobs["vmsnap-backup-disk0"] = {"id": "vmsnap-backup-disk0", "status": "pending", "target": "gone"}
    fake.job_bitmap["vmsnap-backup-disk0"] = ("disk0", BM0)
    fake.jobs["vmsnap-backup-done"] = {"id": "vmsnap-backup-done", "status": "concluded", "target": "gone2"}
    fake.jobs["other"] = {"id": "other", "status": "running", "target": "disk1"}
    fake.nodes[target_node_name("vmsnap-backup-lost")] = {}
    ids = ["vmsnap-backup-disk0", "vmsnap-backup-done", "vmsnap-backup-lost"]
    assert cancel_stale_jobs(client, ids) == ["vmsnap-backup-disk0", "vmsnap-backup-done"]
    assert server.sent("job-cancel") == [("job-cancel", {"id": "vmsnap-backup-disk0"})]
    assert list(fake.jobs) == ["other"]
    assert target_node_name("vmsnap-backup-lost") not in fake.nodes
    assert fake.nodes["disk0"][BM0]["count"] == MIB and not fake.nodes["disk0"][BM0]["busy"]
    with pytest.raises(BackupError, match="Refusing to cancel the job 'other'"):
        cancel_stale_jobs(client, ["other"])
    assert cancel_stale_jobs(client, []) == []


def test_remove_bitmap_touches_only_ours(qemu: t.Any) -> None:
    fake, server, client = qemu()
    fake.bitmap("disk0", BM0)
    fake.bitmap("disk0", "other-tool")
    remove_bitmap(client, "disk0", BM0)
    remove_bitmap(client, "disk0", BM0)  # already gone: nothing to do
    with pytest.raises(BackupError, match="Refusing to remove the bitmap 'other-tool'"):
        remove_bitmap(client, "disk0", "other-tool")
    assert sorted(bitmaps_of(client, "disk0")) == ["other-tool"]
    assert server.sent("block-dirty-bitmap-remove") == [("block-dirty-bitmap-remove", {"node": "disk0", "name": BM0})]


# ---- the helper daemon's start-up failures (real processes, no QEMU) ---------------------------------------------


def open_daemon(image: str, **kwargs: t.Any) -> None:
    with storage_daemon(image, read_only=True, **kwargs):
        pytest.fail("the daemon opened the image")


def test_storage_daemon_that_exits_at_once(tmp_path: pathlib.Path) -> None:
    with pytest.raises(BackupError, match=r"qemu-storage-daemon exited \(rc 1\) before it listened"):
        open_daemon(str(tmp_path / "x.qcow2"), binary="/bin/false")


def test_storage_daemon_that_never_listens_is_stopped(tmp_path: pathlib.Path) -> None:
    script = tmp_path / "silent"
    script.write_text("#!/bin/sh\necho starting\nexec sleep 60\n")
    script.chmod(0o755)
    started = time.monotonic()
    with pytest.raises(BackupError, match="did not open its QMP socket within 0.3 s: starting"):
        open_daemon(str(tmp_path / "x.qcow2"), timeout=0.3, binary=str(script))
    assert time.monotonic() - started < 5  # terminated, not waited for
    assert [p.name for p in tmp_path.iterdir()] == ["silent"]  # private folder removed (it was in the system temp)


def test_storage_daemon_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BackupError, match="qemu-storage-daemon was not found.*qemu-system-common"):
        open_daemon(str(tmp_path / "x.qcow2"))
