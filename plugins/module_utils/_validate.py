# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

# Note that this module util is **PRIVATE** to the collection. It can have breaking changes at any time.
# Do not use this from other collections or standalone plugins/modules!

"""Pure checks of user input, run before any qemu-img call."""

from __future__ import annotations

import os
import stat
import unicodedata

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import ValidationError

# QEMU silently truncates longer tags (qcow2 stores 16 bits, savevm keeps 256 bytes with NUL).
MAX_SNAPSHOT_NAME_BYTES = 255


def validate_image_path(path: str, must_exist: bool = True, what: str = "Image") -> str:
    """Refuse anything that qemu-img could read as something else than a local file.

    what names the kind of path in messages ("Image", "Socket", "Folder"); must_exist=False checks only the form.
    """
    if not isinstance(path, str) or not path:
        raise ValidationError(f"{what} path must be a non-empty string.")
    if path.startswith("json:"):
        raise ValidationError(f"{what} path {path!r} is a QEMU 'json:' pseudo-path; give an absolute path.")
    if any(_is_control(ch) for ch in path):
        raise ValidationError(f"{what} path {path!r} contains a newline or another control character.")
    if not os.path.isabs(path):
        raise ValidationError(f"{what} path {path!r} is relative; give an absolute path.")
    if not must_exist:
        return path
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ValidationError(f"Image {path} does not exist.", image_path=path) from None
    except OSError as exc:
        raise ValidationError(f"Image {path} cannot be read: {exc.strerror}.", image_path=path) from None
    if stat.S_ISDIR(st.st_mode):
        raise ValidationError(f"Image path {path} is a directory, not an image file.", image_path=path)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise ValidationError(f"Image path {path} is neither a regular file nor a block device.", image_path=path)
    return path


def validate_snapshot_name(name: str) -> str:
    """A tag that qemu-img can neither confuse with an ID nor truncate nor mangle."""
    if not isinstance(name, str) or name == "":
        raise ValidationError("Snapshot name must not be empty.")
    if name.isdigit() and name.isascii():
        raise ValidationError(
            f"Snapshot name {name!r} is purely numeric; qemu-img matches snapshot IDs before names "
            f"('qemu-img snapshot -a 1' applies ID 1), so numeric names are refused. Add a letter, e.g. 'snap-{name}'."
        )
    size = len(name.encode("utf-8"))
    if size > MAX_SNAPSHOT_NAME_BYTES:
        raise ValidationError(
            f"Snapshot name is {size} bytes long; QEMU silently truncates names longer than "
            f"{MAX_SNAPSHOT_NAME_BYTES} bytes."
        )
    bad = [ch for ch in name if _is_control(ch)]
    if bad:
        codes = ", ".join(f"U+{ord(ch):04X}" for ch in bad)
        raise ValidationError(f"Snapshot name {name!r} contains control or invisible formatting characters ({codes}).")
    return name


def _is_control(ch: str) -> bool:
    return unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp")
