# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this doc fragment is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

from __future__ import annotations


class ModuleDocFragment:
    DOCUMENTATION = r"""
options:
  lock_timeout:
    description:
      - Seconds to wait for another vmsnap.qemu task that is changing the same image on this host.
      - Tasks that change an image take an exclusive per-image lock (a C(flock) on a small file under
        the lock folder, named after the image's real path) for the whole read, plan and act
        sequence, so two tasks never interleave their writes. When the lock stays held for longer than
        this, the task fails and changes nothing.
      - The lock folder is C(/run/lock/vmsnap.qemu) for root; for other users, and on hosts without a writable
        C(/run/lock), it is C(vmsnap.qemu-<uid>) under C(/run/lock) or the temporary folder (C($TMPDIR), else
        C(/tmp)). It must belong to the task's user and is kept at mode 0700; a folder that is a link or belongs
        to someone else, and a lock file that is a link, are refused. Tasks of different users do not see each
        other's locks. A task that gives up names the holder (its pid, module and start time).
      - The lock is local to the host. Check mode only reads and takes no lock.
    type: float
    default: 60
notes:
  - Images held by a running QEMU are detected through QEMU's own image locks and never written by C(qemu-img).
"""
