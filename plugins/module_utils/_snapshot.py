# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Offline internal snapshots: plan from the image state (pure), then carry the plan out."""

from __future__ import annotations

import functools
import os
import stat
import typing as t
from dataclasses import dataclass, field

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import (
    InsufficientSpaceError,
    QemuImgError,
    ValidationError,
    VmsnapError,
)
from ansible_collections.vmsnap.qemu.plugins.module_utils._image import ImageInfo, Snapshot, metadata_update_reserve
from ansible_collections.vmsnap.qemu.plugins.module_utils._qemu_img import refuse_if_in_use
from ansible_collections.vmsnap.qemu.plugins.module_utils._revert_bitmaps import (
    BlockingBitmap,
    RevertBlockedError,
    blocking_bitmaps,
    check_revert_bitmaps,
    refusal_message,
)

if t.TYPE_CHECKING:
    from ansible_collections.vmsnap.qemu.plugins.module_utils._qemu_img import QemuImg
    from ansible_collections.vmsnap.qemu.plugins.module_utils._retention import RetentionPolicy

# Every internal snapshot adds refcount work to each cluster write of the guest.
MANY_SNAPSHOTS_WARNING_THRESHOLD = 10


@dataclass
class ImagePlan:
    path: str
    info: ImageInfo
    state: str
    name: str | None
    create: bool = False
    delete: Snapshot | None = None
    revert: Snapshot | None = None
    prune: list[Snapshot] = field(default_factory=list)
    backup_bitmaps: str = "fail"
    drop_bitmaps: list[BlockingBitmap] = field(default_factory=list)  # backup bitmaps removed before the revert
    warnings: list[str] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.create or self.delete is not None or self.revert is not None or bool(self.prune)

    @property
    def where(self) -> str:
        return f"image {self.path}"

    def names_before(self) -> list[str]:
        return [snap.name for snap in self.info.snapshots]

    def names_after(self) -> list[str]:
        return [snap["name"] for snap in self.predicted_snapshots()]

    def predicted_snapshots(self) -> list[dict[str, t.Any]]:
        """The snapshot list once the plan is carried out; a new snapshot has no ID or date yet."""
        gone = {snap.id for snap in self.prune}
        if self.delete is not None:
            gone.add(self.delete.id)
        kept = [snap.as_dict() for snap in self.info.snapshots if snap.id not in gone]
        return kept + ([self.predicted_new()] if self.create else [])

    def predicted_new(self) -> dict[str, t.Any]:
        return dict(id=None, name=self.name, vm_state_size=0, date=None, date_epoch=None, vm_clock=0.0)


def plan_image(
    path: str,
    info: ImageInfo,
    state: str,
    name: str | None,
    policy: RetentionPolicy | None,
    now: float,
    backup_bitmaps: str = "fail",
) -> ImagePlan:
    """Decide what one image needs. Raises before anything is touched when the request cannot be met.

    backup_bitmaps (state reverted): "drop" removes the image's qcow2_backup bitmaps before the revert, "fail"
    refuses; any other tool's bitmap always refuses.
    """
    _require_qcow2(path, info)
    plan = ImagePlan(path=path, info=info, state=state, name=name, backup_bitmaps=backup_bitmaps)
    if state == "present":
        plan.create = not info.snapshots_named(t.cast(str, name))
    elif state == "absent":
        existing = _single_snapshot(path, info, t.cast(str, name), state, required=False)
        plan.delete = existing
    elif state == "reverted":
        plan.revert = _single_snapshot(path, info, t.cast(str, name), state, required=True)
    if policy is not None and state in ("present", "pruned"):
        plan.prune, skipped = _prunable(info, policy, now, protect=name if state == "present" else None)
        plan.warnings.extend(
            f"{path}: not pruning snapshot '{snap.name}' (id {snap.id}): another snapshot has the same name "
            "and qemu-img deletes by name only."
            for snap in skipped
        )
    if plan.changed:
        _require_writable(path, info)
    if plan.revert is not None:
        found = blocking_bitmaps((bitmap.name, False) for bitmap in info.top.bitmaps)
        try:
            check_revert_bitmaps([(plan.where, found)], plan.revert.name, backup_bitmaps)
        except RevertBlockedError as exc:
            exc.details["image_path"] = path
            raise
        plan.drop_bitmaps = found
    count_after = len(plan.names_after())
    if count_after > MANY_SNAPSHOTS_WARNING_THRESHOLD:
        plan.warnings.append(
            f"{path} holds {count_after} internal snapshots; each one slows guest writes (copy-on-write "
            "refcount updates). Prune old ones, e.g. with the retention option."
        )
    return plan


def _require_qcow2(path: str, info: ImageInfo) -> None:
    if info.top.format != "qcow2":
        raise ValidationError(
            f"Image {path} is in {info.top.format} format; internal snapshots need a qcow2 image.",
            image_path=path,
            format=info.top.format,
        )


def _require_writable(path: str, info: ImageInfo) -> None:
    refuse_if_in_use(info, path)
    if info.top.corrupt:
        raise ValidationError(
            f"Image {path} is marked corrupt by QEMU; refusing to change it. Inspect it with "
            "vmsnap.qemu.qcow2_info (check: true) and repair it with 'qemu-img check -r' first.",
            image_path=path,
        )


def _single_snapshot(path: str, info: ImageInfo, name: str, state: str, required: bool) -> Snapshot | None:
    found = info.snapshots_named(name)
    if len(found) > 1:
        ids = [snap.id for snap in found]
        raise ValidationError(
            f"Snapshot name '{name}' is ambiguous in {path}: {len(found)} snapshots share it (IDs "
            f"{', '.join(ids)}); refusing state={state}. Remove the duplicates with qemu-img first.",
            image_path=path,
            snapshot_ids=ids,
        )
    if not found:
        if required:
            raise ValidationError(
                f"Snapshot '{name}' does not exist in {path}; cannot revert to it. Existing snapshots: "
                f"{', '.join(snap.name for snap in info.snapshots) or 'none'}.",
                image_path=path,
            )
        return None
    return found[0]


def _prunable(
    info: ImageInfo, policy: RetentionPolicy, now: float, protect: str | None
) -> tuple[list[Snapshot], list[Snapshot]]:
    doomed = policy.select(info.snapshots, now=now, protect=protect)
    doomed_ids = {snap.id for snap in doomed}
    deletable, skipped = [], []
    for snap in doomed:
        twins = info.snapshots_named(snap.name)
        (deletable if all(twin.id in doomed_ids for twin in twins) else skipped).append(snap)
    return deletable, skipped


def ensure_room_for_metadata(plan: ImagePlan) -> None:
    """qemu-img leaks clusters and leaves a changed image when it hits ENOSPC mid-update: refuse first."""
    try:
        st = os.stat(plan.path)
    except OSError:
        return
    if not stat.S_ISREG(st.st_mode):
        return  # a block device cannot grow; qemu-img reports its own ENOSPC there
    vfs = os.statvfs(os.path.dirname(plan.path))
    free = vfs.f_bavail * vfs.f_frsize
    needed = metadata_update_reserve(plan.info.top, extra_snapshots=1 if plan.create else 0)
    if free < needed:
        raise InsufficientSpaceError(
            f"Not enough free space for {plan.path}: {free} bytes free on its filesystem, at least {needed} "
            "needed for the snapshot metadata update. Nothing was changed; free some space first.",
            image_path=plan.path,
            free_bytes=free,
            needed_bytes=needed,
        )


def execute(qemu_img: QemuImg, plans: list[ImagePlan]) -> None:
    """Carry out plans. Creation is all-or-nothing across images; deletions and reverts cannot be undone.

    On failure the error lists, in details["changed_paths"], the images this task did change.
    """
    for plan in plans:
        if plan.changed:
            ensure_room_for_metadata(plan)
    changed: list[str] = []
    try:
        _create_all_or_nothing(qemu_img, [plan for plan in plans if plan.create])
        changed.extend(plan.path for plan in plans if plan.create)
        for plan in plans:
            for step in _irreversible_steps(qemu_img, plan):
                step()
                if plan.path not in changed:
                    changed.append(plan.path)
    except VmsnapError as exc:
        if changed:
            exc.msg += f" Images already changed by this task before the failure: {', '.join(changed)}."
            exc.details["changed_paths"] = changed
        raise


def _irreversible_steps(qemu_img: QemuImg, plan: ImagePlan) -> list[t.Callable[[], None]]:
    steps: list[t.Callable[[], None]] = []
    if plan.delete is not None:
        steps.append(functools.partial(qemu_img.snapshot_delete, plan.path, plan.delete.name))
    if plan.revert is not None:
        drops = [t.cast(str, bitmap.name) for bitmap in plan.drop_bitmaps]
        steps.extend(functools.partial(_remove_bitmap, qemu_img, plan.path, name) for name in drops)
        steps.append(functools.partial(_apply_snapshot, qemu_img, plan))
    steps.extend(functools.partial(qemu_img.snapshot_delete, plan.path, snap.name) for snap in plan.prune)
    return steps


def _remove_bitmap(qemu_img: QemuImg, path: str, name: str) -> None:
    qemu_img.run(["bitmap", "--remove", "-f", "qcow2", "--", path, name])


def _apply_snapshot(qemu_img: QemuImg, plan: ImagePlan) -> None:
    """qemu-img snapshot -a; a bitmap that appeared since the plan (a backup started meanwhile) is named, not
    reported in QEMU's words."""
    snapshot = t.cast(Snapshot, plan.revert)
    try:
        qemu_img.snapshot_apply(plan.path, snapshot.name)
    except QemuImgError as exc:
        if "active dirty bitmaps" not in exc.stderr:
            raise
        try:
            now = qemu_img.read_top(plan.path)
        except VmsnapError:
            raise exc from None
        found = blocking_bitmaps((bitmap.name, False) for bitmap in now.top.bitmaps)
        msg = refusal_message([(plan.where, found)], snapshot.name, plan.backup_bitmaps, nothing_changed=False)
        raise RevertBlockedError(
            msg + " They appeared after the task had checked the image, and the snapshot was not applied; run the "
            "task again.",
            image_path=plan.path,
            bitmaps=[bitmap.name for bitmap in found],
        ) from None


def _create_all_or_nothing(qemu_img: QemuImg, plans: list[ImagePlan]) -> None:
    """Create on every image (in parallel); if any fails, delete the ones that succeeded and raise."""

    def attempt(plan: ImagePlan) -> VmsnapError | None:
        try:
            qemu_img.snapshot_create(plan.path, t.cast(str, plan.name))
        except VmsnapError as exc:
            return exc
        return None

    outcomes = qemu_img.map_parallel(attempt, plans)
    failures = [(plan, exc) for plan, exc in zip(plans, outcomes) if exc is not None]
    if not failures:
        return
    created = [plan for plan, exc in zip(plans, outcomes) if exc is None]
    undone, stuck = [], []
    for plan in created:
        try:
            qemu_img.snapshot_delete(plan.path, t.cast(str, plan.name))
            undone.append(plan.path)
        except VmsnapError as undo_exc:
            stuck.append(f"{plan.path} ({undo_exc.msg})")
    failed_plan, error = failures[0]
    error.msg = f"Creating snapshot '{failed_plan.name}' on {failed_plan.path} failed: {error.msg}"
    for other_plan, other in failures[1:]:
        error.msg += f" It also failed on {other_plan.path}: {other.msg}"
    if undone:
        error.msg += f" Removed the snapshots this task had already made on: {', '.join(undone)}."
    if stuck:
        error.msg += f" Could NOT remove the snapshot made on: {'; '.join(stuck)}."
    error.details.update(
        failed_paths=[plan.path for plan, dummy in failures], rolled_back=undone, rollback_failed=stuck
    )
    raise error
