# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""The one error family of the collection: modules turn it into fail_json."""

from __future__ import annotations

import typing as t

if t.TYPE_CHECKING:
    from ansible.module_utils.basic import AnsibleModule


class VmsnapError(Exception):
    """Base class: a message for the user plus extra keys for the failed result."""

    def __init__(self, msg: str, **details: t.Any) -> None:
        super().__init__(msg)
        self.msg = msg
        self.details = details

    def do_fail(self, module: AnsibleModule, **result: t.Any) -> t.NoReturn:
        merged = dict(result)
        merged.update(self.details)
        module.fail_json(msg=self.msg, **merged)


class ValidationError(VmsnapError):
    """A parameter is unusable; nothing was touched."""


class QemuImgError(VmsnapError):
    """qemu-img exited non-zero or printed output that could not be parsed."""

    def __init__(self, msg: str, cmd: list[str], rc: int, stdout: str, stderr: str) -> None:
        super().__init__(msg, cmd=cmd, rc=rc, stdout=stdout, stderr=stderr)
        self.cmd = cmd
        self.rc = rc
        self.stdout = stdout
        self.stderr = stderr


class ImageInUseError(VmsnapError):
    """Another process (normally a running QEMU) holds the image's write lock."""


class LockTimeoutError(VmsnapError):
    """Another vmsnap task kept the per-image lock for longer than allowed."""


class InsufficientSpaceError(VmsnapError):
    """The filesystem holding an image has too little room for a metadata update."""
