# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""qcow2_backup on offline images: the module's main() in this process with real qemu-img, qemu-storage-daemon and
files. Full -> B -> incremental -> C -> incremental and each restored, the four runs of present/pruned/restored,
broken chains, verified against a flipped byte, retention merges, every bad input (message asserted, image and set
byte-identical), a foreign bitmap never touched, and SIGKILL of the module, of qemu-img and of the helper daemon."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import time
import typing as t
from pathlib import Path

import pytest
from qcow2_backup_helpers import (
    MIB,
    bitmaps,
    first_data_offset,
    flip_byte,
    gone,
    module_argv,
    module_env,
    new_image,
    ok,
    qemu_img,
    reads,
    run,
    tree,
    write,
)

FOREIGN = "other-tool"


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    image = new_image(tmp_path / "web01-disk0.qcow2")
    write(image, 0xAA, 0)
    qemu_img("bitmap", "--add", str(image), FOREIGN)
    return image


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    folder = tmp_path / "backups"
    folder.mkdir()
    return folder


def index_of(dest: Path, set_name: str = "web01-disk0") -> dict[str, t.Any]:
    return t.cast("dict[str, t.Any]", json.loads((dest / set_name / "index.json").read_text()))


def four_runs(**args: t.Any) -> list[dict[str, t.Any]]:
    runs = [run(check=True, diff=True, **args), run(diff=True, **args), run(**args), run(check=True, **args)]
    assert [r["failed"] for r in runs] == [False] * 4, runs
    assert [r["changed"] for r in runs] == [True, True, False, False], runs
    return runs


def test_full_incremental_incremental_and_each_restored(disk: Path, dest: Path, tmp_path: Path) -> None:
    base = dict(path=str(disk), dest_dir=str(dest))
    full = ok(**base)["backup"]
    assert (full["mode"], full["parent"], full["full_reason"]) == ("full", None, "the set has no backup yet")
    write(disk, 0xBB, 2 * MIB)
    inc1 = ok(**base)["backup"]
    write(disk, 0xCC, 4 * MIB)
    write(disk, 0xDD, 0, 64 * 1024)
    inc2 = ok(**base)["backup"]
    assert (inc1["mode"], inc1["parent"], inc2["parent"]) == ("incremental", full["id"], inc1["id"])
    # Only the changed clusters: 1 MiB, then 1 MiB + 64 KiB; the files hold little more than that.
    assert (inc1["changed_bytes"], inc2["changed_bytes"]) == (MIB, MIB + 64 * 1024)
    assert MIB < inc1["size"] < MIB + 512 * 1024 and MIB < inc2["size"] < MIB + 576 * 1024
    assert qemu_img("info", "--output=json", inc2["file"]).count('"backing-filename": "' + Path(inc1["file"]).name)
    index = index_of(dest)
    assert index["source"] == str(disk) and index["pending"] is None and len(index["backups"]) == 3
    assert oct((dest / "web01-disk0" / "index.json").stat().st_mode & 0o777) == "0o600"
    assert oct((dest / "web01-disk0").stat().st_mode & 0o777) == "0o700"

    expected = {
        full["id"]: [(0xAA, 0, MIB), (0, 2 * MIB, MIB), (0, 4 * MIB, MIB)],
        inc1["id"]: [(0xAA, 0, MIB), (0xBB, 2 * MIB, MIB), (0, 4 * MIB, MIB)],
        inc2["id"]: [
            (0xDD, 0, 64 * 1024),
            (0xAA, 64 * 1024, MIB - 64 * 1024),
            (0xBB, 2 * MIB, MIB),
            (0xCC, 4 * MIB, MIB),
        ],
    }
    for backup_id, patterns in expected.items():
        target = tmp_path / f"restored-{backup_id}.qcow2"
        restored = ok(state="restored", backup_id=backup_id, restore_to=str(target), **base)
        assert restored["changed"] and restored["restored"]["id"] == backup_id
        assert info_backing(target) is None
        for pattern, offset, length in patterns:
            assert reads(target, pattern, offset, length), (backup_id, pattern, offset)
    overlay = tmp_path / "restored-chain.qcow2"
    ok(state="restored", backup_id=inc1["id"], restore_to=str(overlay), restore_as="chain", **base)
    assert info_backing(overlay) == inc1["file"] and reads(overlay, 0xBB, 2 * MIB)
    verified = ok(state="verified", **base)
    assert not verified["changed"] and [v["ok"] for v in verified["verified"]] == [True] * 3
    assert FOREIGN in bitmaps(disk)


def info_backing(image: Path) -> str | None:
    return t.cast("str | None", json.loads(qemu_img("info", "--output=json", str(image))).get("full-backing-filename"))


def test_four_runs_of_present_restored_and_pruned(disk: Path, dest: Path, tmp_path: Path) -> None:
    base = dict(path=str(disk), dest_dir=str(dest))
    check, real, again, dummy = four_runs(mode="full", **base)
    assert check["diff"] == {"before": {"web01-disk0": []}, "after": {"web01-disk0": [check["backup"]["id"]]}}
    assert again["backup"] == real["backup"] and real["backup"]["mode"] == "full"
    forced = ok(mode="full", skip_unchanged=False, compress=True, **base)
    assert forced["changed"] and forced["backup"]["mode"] == "full" and forced["backup"]["id"] != real["backup"]["id"]
    assert forced["backup"]["compressed"] and forced["backup"]["size"] < real["backup"]["size"]
    assert forced["sets"][0]["bitmap"] != real["sets"][0]["bitmap"]
    assert set(bitmaps(disk)) == {FOREIGN, forced["sets"][0]["bitmap"]}  # the old chain's bitmap is gone

    target = tmp_path / "restored.qcow2"
    check, real, again, dummy = four_runs(state="restored", restore_to=str(target), **base)
    assert not os.path.exists(str(target) + ".check") and real["restored"]["id"] == forced["backup"]["id"]
    assert reads(target, 0xAA, 0)

    write(disk, 0xBB, 0)
    ok(**base)
    check, real, again, dummy = four_runs(state="pruned", retention={"keep": 1}, **base)
    assert check["sets"][0]["pruned"] == real["sets"][0]["pruned"] and len(real["sets"][0]["pruned"]) == 2
    assert check["diff"]["after"]["web01-disk0"] == real["sets"][0]["kept"]
    assert [b["mode"] for b in index_of(dest)["backups"]] == ["full"]  # the incremental absorbed its full backup
    assert ok(state="verified", **base)["verified"][0]["ok"]
    assert sorted(os.listdir(dest / "web01-disk0")) == sorted(["index.json", index_of(dest)["backups"][0]["file"]])


def test_retention_merges_what_a_kept_backup_needs(disk: Path, dest: Path, tmp_path: Path) -> None:
    base = dict(path=str(disk), dest_dir=str(dest))
    ids = [ok(**base)["backup"]["id"]]
    for pattern in (0xB1, 0xB2, 0xB3):
        write(disk, pattern, (pattern - 0xB0) * MIB)
        ids.append(ok(**base)["backup"]["id"])
    # Spread the backups over days (the index is what retention reads): F d-3, I1 and I2 d-2, I3 today.
    index_path = dest / "web01-disk0" / "index.json"
    index = json.loads(index_path.read_text())
    now = time.time()
    for entry, age in zip(index["backups"], (3 * 86400, 2 * 86400 + 60, 2 * 86400, 0)):
        entry["epoch"] = now - age
    index_path.write_text(json.dumps(index))
    pruned = ok(state="pruned", retention={"keep_daily": 3}, **base)
    assert pruned["sets"][0]["pruned"] == [ids[1]] and pruned["sets"][0]["kept"] == [ids[0], ids[2], ids[3]]
    after = {entry["id"]: entry for entry in index_of(dest)["backups"]}
    assert after[ids[2]]["parent"] == ids[0] and after[ids[2]]["mode"] == "incremental"
    assert ok(state="verified", **base)["verified"] and not os.path.exists(dest / "web01-disk0" / f"{ids[1]}.inc.qcow2")
    target = tmp_path / "r.qcow2"
    ok(state="restored", backup_id=ids[2], restore_to=str(target), **base)
    assert reads(target, 0xB1, MIB) and reads(target, 0xB2, 2 * MIB) and reads(target, 0, 3 * MIB)
    # max_age removes everything older, never the newest; the kept one that lost its chain becomes full.
    pruned = ok(state="pruned", retention={"max_age": "1d"}, **base)
    assert pruned["sets"][0]["kept"] == [ids[3]] and index_of(dest)["backups"][0]["mode"] == "full"
    target.unlink()
    ok(state="restored", restore_to=str(target), **base)
    assert all(reads(target, p, (p - 0xB0) * MIB) for p in (0xB1, 0xB2, 0xB3)) and reads(target, 0xAA, 0)
    assert FOREIGN in bitmaps(disk)


def test_broken_chains(disk: Path, dest: Path) -> None:
    base = dict(path=str(disk), dest_dir=str(dest))
    first = ok(**base)
    bitmap = first["sets"][0]["bitmap"]
    write(disk, 0xBB, 0)
    qemu_img("bitmap", "--remove", str(disk), bitmap)
    before = tree(disk, dest)
    failed = run(on_broken_chain="fail", **base)
    assert failed["failed"] and not failed["changed"] and tree(disk, dest) == before
    assert f"cannot take an incremental backup: the bitmap {bitmap} is missing on the disk" in failed["msg"]
    full = ok(**base)
    assert full["backup"]["mode"] == "full" and "is missing on the disk" in full["backup"]["full_reason"]
    assert any("took a FULL backup instead of an incremental one" in w for w in full["warnings"]), full

    # A writer killed while the disk was open leaves the bitmap in-use (inconsistent).
    daemon = subprocess.Popen(
        ["qemu-storage-daemon", "--blockdev", f"driver=file,filename={disk},node-name=f",
         "--blockdev", "driver=qcow2,file=f,node-name=d"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 10

    def flags_now() -> list[str]:
        """The bitmap's flags as qemu-img -U reads them while the daemon rewrites the bitmap directory: a read in
        the middle of that rewrite can miss the bitmap or fail, which is not the state being waited for."""
        try:
            return bitmaps(disk).get(full["sets"][0]["bitmap"], [])
        except subprocess.CalledProcessError:
            return []

    while "in-use" not in flags_now():
        assert time.monotonic() < deadline and daemon.poll() is None
        time.sleep(0.05)
    daemon.send_signal(signal.SIGKILL)
    daemon.wait()
    write(disk, 0xCC, 0)
    again = ok(**base)
    assert again["backup"]["mode"] == "full" and "is inconsistent" in again["backup"]["full_reason"]
    assert set(bitmaps(disk)) == {FOREIGN, again["sets"][0]["bitmap"]}  # the inconsistent one is removed

    index = index_of(dest)
    index["pending"] = {"id": "20260101T000000Z", "time": "2026-01-01T00:00:00Z", "temp": ".tmp-x.qcow2"}
    (dest / "web01-disk0" / "index.json").write_text(json.dumps(index))
    write(disk, 0xDD, 0)
    after_pending = ok(**base)
    assert after_pending["backup"]["mode"] == "full"
    assert "the backup 20260101T000000Z of 2026-01-01T00:00:00Z was interrupted" in after_pending["warnings"][0]
    assert index_of(dest)["pending"] is None


def test_two_folders_back_up_one_disk_side_by_side(disk: Path, dest: Path, tmp_path: Path) -> None:
    """A nightly set here and a weekly one on other storage, both named after the disk: each keeps its own chain
    (and bitmap) and takes incrementals; neither removes the other's bitmap as stale."""
    other = tmp_path / "offsite"
    other.mkdir()
    here, there = dict(path=str(disk), dest_dir=str(dest)), dict(path=str(disk), dest_dir=str(other))
    assert ok(**here)["backup"]["mode"] == ok(**there)["backup"]["mode"] == "full"
    for pattern in (0xB1, 0xB2):
        write(disk, pattern, 2 * MIB)
        first, second = ok(**here)["backup"], ok(**there)["backup"]
        assert (first["mode"], second["mode"]) == ("incremental", "incremental")
        assert first["changed_bytes"] == MIB and second["changed_bytes"] == MIB
    ours = {index_of(dest)["bitmap"], index_of(other)["bitmap"]}
    assert len(ours) == 2 and ours | {FOREIGN} == set(bitmaps(disk))


def test_verified_detects_one_changed_byte(disk: Path, dest: Path, tmp_path: Path) -> None:
    base = dict(path=str(disk), dest_dir=str(dest))
    full = ok(**base)["backup"]
    write(disk, 0xBB, 0)
    inc = ok(**base)["backup"]
    flip_byte(Path(inc["file"]), first_data_offset(Path(inc["file"])) + 4096)
    verified = run(state="verified", **base)
    assert verified["failed"] and f"web01-disk0/{inc['id']}: its content does not match the checksum" in verified["msg"]
    assert [v["ok"] for v in verified["sets"][0]["verified"]] == [True, False]
    assert ok(state="verified", backup_id=full["id"], **base)["verified"][0]["ok"]
    refused = run(state="restored", restore_to=str(tmp_path / "r.qcow2"), **base)
    assert refused["failed"] and "fails verification" in refused["msg"] and not (tmp_path / "r.qcow2").exists()


def test_a_damaged_backup_is_never_merged_into_a_kept_one(disk: Path, dest: Path) -> None:
    """keep: 1 merges the full into the kept incremental and gives it a fresh checksum: a damaged incremental would
    be recorded as good and the good full deleted. The prune refuses, naming the backup, and changes nothing."""
    base = dict(path=str(disk), dest_dir=str(dest))
    full = ok(**base)["backup"]
    write(disk, 0xBB, 0)
    inc = ok(**base)["backup"]
    flip_byte(Path(inc["file"]), first_data_offset(Path(inc["file"])) + 4096)
    before = tree(dest)
    refused = run(state="pruned", retention={"keep": 1}, **base)
    assert refused["failed"] and not refused["changed"], refused
    assert f"backup {inc['id']}: its content does not match the checksum" in refused["msg"], refused["msg"]
    assert "Nothing was pruned or merged." in refused["msg"]
    assert tree(dest) == before and os.path.exists(full["file"])


def test_prune_never_deletes_a_file_a_kept_backup_really_uses(disk: Path, dest: Path) -> None:
    """A merge renamed into place by a run killed before it updated the index: I2 is really backed by F, the index
    still says I1. keep: 2 plans to delete F (I1 made standalone); the prune reads the files' real backing files and
    refuses, and I2 stays readable. verified reports the disagreement."""
    base = dict(path=str(disk), dest_dir=str(dest))
    full = ok(**base)["backup"]
    write(disk, 0xB1, MIB)
    inc1 = ok(**base)["backup"]
    write(disk, 0xB2, 2 * MIB)
    inc2 = ok(**base)["backup"]
    folder = dest / "web01-disk0"
    subprocess.run(
        ["qemu-img", "rebase", "-q", "-f", "qcow2", "-b", Path(full["file"]).name, "-F", "qcow2", "--", inc2["file"]],
        check=True, cwd=folder,
    )  # fmt: skip
    before = tree(dest)
    refused = run(state="pruned", retention={"keep": 2}, **base)
    assert refused["failed"] and not refused["changed"], refused
    assert f"{Path(inc2['file']).name} is backed by {Path(full['file']).name}" in refused["msg"], refused["msg"]
    assert "Nothing was pruned or merged." in refused["msg"]
    assert tree(dest) == before
    assert reads(inc2["file"], 0xAA, 0) and reads(inc2["file"], 0xB1, MIB) and reads(inc2["file"], 0xB2, 2 * MIB)
    verified = run(state="verified", **base)
    disagree = f"{inc2['id']}: its backing file is {Path(full['file']).name}, not {Path(inc1['file']).name}"
    assert verified["failed"] and disagree in verified["msg"], verified["msg"]


def test_verified_reports_a_missing_backing_file_as_a_problem(disk: Path, dest: Path) -> None:
    base = dict(path=str(disk), dest_dir=str(dest))
    full = ok(**base)["backup"]
    write(disk, 0xBB, 0)
    inc = ok(**base)["backup"]
    os.unlink(full["file"])
    verified = run(state="verified", **base)
    assert verified["failed"] and not verified["changed"], verified
    assert f"web01-disk0/{full['id']}: the file {Path(full['file']).name} is missing" in verified["msg"]
    assert f"web01-disk0/{inc['id']}: qemu-img cannot check {Path(inc['file']).name}: " in verified["msg"]
    assert [v["ok"] for v in verified["sets"][0]["verified"]] == [False, False]


def test_bad_inputs_change_nothing(disk: Path, dest: Path, tmp_path: Path) -> None:
    base = dict(path=str(disk), dest_dir=str(dest))
    full = ok(**base)["backup"]
    other = new_image(tmp_path / "other.qcow2")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    existing = tmp_path / "existing.qcow2"
    new_image(existing)
    cases: list[tuple[dict[str, t.Any], str]] = [
        (dict(path=str(disk), dest_dir="backups"), "dest_dir 'backups' is relative; give an absolute path"),
        (dict(path=str(disk), dest_dir=str(tmp_path / "nope")), "does not exist; create it first"),
        (dict(path=str(disk), dest_dir=str(a_file)), f"dest_dir {a_file} is not a folder"),
        (dict(path=str(other), dest_dir=str(dest), set_name="web01-disk0"), "belongs to another disk"),
        (
            dict(state="restored", backup_id="20200101T000000Z", restore_to=str(tmp_path / "r.qcow2"), **base),
            f"Backup 20200101T000000Z does not exist in the set web01-disk0; it has {full['id']}",
        ),
        (dict(state="verified", backup_id="nonsense", **base), "backup_id 'nonsense' is not a backup id"),
        (dict(state="restored", restore_to=str(existing), **base), "exists (and does not hold backup"),
        (dict(path=str(other), dest_dir=str(dest), mode="incremental"), "has no full backup yet"),
        (dict(path="json:{}", dest_dir=str(dest)), "is a QEMU 'json:' pseudo-path"),
        (dict(path="disk.qcow2", dest_dir=str(dest)), "is relative; give an absolute path"),
        (dict(dest_dir=str(dest), set_name="../x", state="verified"), "set_name '../x' is not usable"),
        (dict(path=str(disk), dest_dir=str(dest), state="pruned", retention={"keep": -1}), "retention.keep"),
    ]
    before = tree(disk, dest, other, existing)
    for args, message in cases:
        for check in (False, True):
            result = run(check=check, **args)
            assert result["failed"] and not result["changed"], (args, result)
            assert message in result["msg"], (args, result["msg"])
    assert tree(disk, dest, other, existing) == before
    assert not (dest / "other").exists()


def test_a_full_filesystem_is_refused_before_writing(tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    disk = new_image(tmp_path / "big.qcow2", "64M")
    write(disk, 0xAA, 0, 8 * MIB)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "vmsnap-backup-test", str(small)], check=True)
    try:
        before = tree(disk, small)
        for check in (True, False):
            result = run(check=check, path=str(disk), dest_dir=str(small))
            assert result["failed"] and not result["changed"], result
            assert f"Not enough free space in {small} for the backup: it needs about" in result["msg"], result
            assert result["needed_bytes"] > result["free_bytes"]
        assert tree(disk, small) == before and bitmaps(disk) == {}
        subprocess.run(["mount", "-o", "remount,size=24m", str(small)], check=True)
        ok(path=str(disk), dest_dir=str(small))
        write(disk, 0xBB, 0, 8 * MIB)
        write(disk, 0xCC, 16 * MIB, 12 * MIB)
        before = tree(disk, small)
        result = run(path=str(disk), dest_dir=str(small))
        assert result["failed"] and "Not enough free space" in result["msg"] and tree(disk, small) == before
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_an_image_in_use_is_refused_with_a_pointer_to_socket(disk: Path, dest: Path, tmp_path: Path) -> None:
    sock = tmp_path / "vm.qmp"
    qemu = subprocess.Popen(
        ["qemu-system-x86_64", "-machine", "pc", "-accel", "tcg", "-display", "none", "-nodefaults", "-m", "32", "-S",
         "-qmp", f"unix:{sock},server=on,wait=off", "-drive", f"file={disk},format=qcow2,if=virtio"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for state in ("present", "pruned"):
            args: dict[str, t.Any] = dict(path=str(disk), dest_dir=str(dest), state=state)
            if state == "pruned":
                args["retention"] = {"keep": 1}
            result = run(**args)
            assert result["failed"] and "back it up through the VM's QMP socket instead (socket" in result["msg"]
        assert not (dest / "web01-disk0").exists()
    finally:
        qemu.kill()
        qemu.wait()


def _kill_when(proc: subprocess.Popen[bytes], ready: t.Callable[[], int | None], what: str) -> None:
    """Wait until ready() names a pid (or 0 for the module itself), then SIGKILL it."""
    deadline = time.monotonic() + 60
    while True:
        pid = ready()
        if pid is not None:
            os.kill(pid or proc.pid, signal.SIGKILL)
            break
        assert proc.poll() is None, f"the module ended before {what}: {proc.stdout.read() if proc.stdout else ''}"
        assert time.monotonic() < deadline, f"never saw {what}"
        time.sleep(0.01)
    proc.wait(60)


def _copier_ready(folder: Path, parent: int, copier: str, victim: str, helpers: list[int]) -> int | None:
    """Once the backup's temporary file has grown: the pid to kill (0 = the module), noting the copier's pid."""
    temps = list(folder.glob(".tmp-*.qcow2")) if folder.exists() else []
    if not temps or temps[0].stat().st_size < 8 * MIB:
        return None
    child = _child(parent, copier)
    helpers.extend([child] if child else [])
    return 0 if victim == "module" else child


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 30
    while not gone(pid):
        assert time.monotonic() < deadline, f"pid {pid} did not end"
        time.sleep(0.02)


def _child(parent: int, name: str) -> int | None:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            comm = stat[stat.index("(") + 1 : stat.rindex(")")]
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            if ppid == parent and comm == name[:15]:
                return int(entry.name)
    return None


@pytest.mark.parametrize("victim", ["module", "copier"])
def test_killed_during_full_and_incremental(tmp_path: Path, victim: str) -> None:
    """SIGKILL of the module, or of its copying process (qemu-img for a full, the helper daemon for an incremental):
    earlier backups stay intact and verify, the next run removes the leftovers and succeeds."""
    disk = new_image(tmp_path / "big.qcow2", "256M")
    random_data = tmp_path / "random.raw"
    random_data.write_bytes(os.urandom(128 * MIB))
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", str(random_data), str(disk)], check=True)
    dest = tmp_path / "backups"
    dest.mkdir()
    base = dict(path=str(disk), dest_dir=str(dest))
    folder = dest / "big"
    for step in ("full", "incremental"):
        if step == "incremental":
            earlier = ok(**base)["backup"]
            subprocess.run(
                ["qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", str(random_data), str(disk)], check=True
            )  # rewrites every cluster, so the incremental copies 128 MiB
        proc = subprocess.Popen(
            module_argv(dict(base, mode=step if step == "full" else "auto"), tmp_path),
            env=module_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip

        copier = "qemu-img" if step == "full" else "qemu-storage-daemon"
        helpers: list[int] = []

        ready = functools.partial(_copier_ready, folder, proc.pid, copier, victim, helpers)
        _kill_when(proc, ready, f"the {step} backup's temporary file")
        for pid in helpers:  # a helper of a killed module dies with it (PDEATHSIG), a moment later
            _wait_gone(pid)
        if victim == "copier":
            assert proc.returncode == 1 and b'"failed": true' in t.cast(t.IO[bytes], proc.stdout).read()
        index = json.loads((folder / "index.json").read_text()) if (folder / "index.json").exists() else None
        if step == "incremental":
            assert index is not None and [b["id"] for b in index["backups"]] == [earlier["id"]]
            assert ok(state="verified", **base)["verified"][0]["ok"]
        else:
            assert index is None or index["backups"] == []
        again = ok(**base)
        assert again["changed"] and not list(folder.glob(".tmp-*"))
        names = sorted(p.name for p in folder.iterdir())
        assert names == sorted(["index.json"] + [b["file"] for b in index_of(dest, "big")["backups"]])
        assert all(v["ok"] for v in ok(state="verified", **base)["verified"])
        assert set(bitmaps(disk)) == {again["sets"][0]["bitmap"]}
        if step == "incremental" and victim == "copier":
            assert again["backup"]["mode"] == "full" and "inconsistent" in again["backup"]["full_reason"]
