# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

"""The tiny guest (tiny_guest.py) plus Python 3.11 from Debian's packages, so that Ansible modules run inside it.

Same recipe: ``apt-get download`` and ``dpkg-deb -x``, nothing installed on the host, every shared library
resolved by the unpacked loader inside the unpacked packages. The image is cached beside the tiny guest's,
keyed by the .deb SHA256s and PYTHON_FORMAT. The standard library is compiled at build time by the unpacked
interpreter itself (run on the host through the unpacked loader), so a fresh boot does not compile it under TCG.
Standard library only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tiny_guest import LIB_DIR, LOADER, GuestError, GuestImage, _copy_file, _loader_deps, build_tiny_guest

PYTHON_VERSION = "3.11"
# The interpreter, its standard library and the shared libraries they need (libc6 comes with the tiny guest).
PYTHON_PACKAGES = (
    f"python{PYTHON_VERSION}-minimal",
    f"libpython{PYTHON_VERSION}-minimal",
    f"libpython{PYTHON_VERSION}-stdlib",
    "libexpat1",
    "zlib1g",
    "libssl3",
    "libffi8",
    "libbz2-1.0",
    "liblzma5",
    "libuuid1",
)
PYTHON_FORMAT = "python-1"  # bump when the files taken or their layout change
# Extension modules that must load in the guest; others are kept only when all their libraries are unpacked
# (readline, curses, dbm, sqlite3, nis and crypt need packages this guest leaves out).
REQUIRED_EXTENSIONS = ("_hashlib", "_json", "_bz2", "_lzma", "_ctypes", "_ssl", "_uuid", "_decimal", "mmap", "termios")
# Parts of the standard library no Ansible module needs.
SKIPPED = ("test", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3", "pydoc_data", "__pycache__")


def _stdlib(root: Path) -> Path:
    return root / "usr/lib" / f"python{PYTHON_VERSION}"


def _add_python(staging: Path, root: Path) -> None:
    """customize() hook of build_tiny_guest: the interpreter, its library and their shared libraries."""
    binary = staging / "usr/bin" / f"python{PYTHON_VERSION}"
    _copy_file(binary, root / "usr/bin" / binary.name, 0o755)
    os.symlink(binary.name, root / "usr/bin/python3")
    shutil.copytree(
        staging / "usr/lib" / f"python{PYTHON_VERSION}",
        _stdlib(root),
        symlinks=False,
        ignore=lambda folder, names: [n for n in names if n in SKIPPED or n.startswith("_test")],
    )
    dynload = _stdlib(root) / "lib-dynload"
    needed = list(_loader_deps(staging, binary))
    for ext in sorted(dynload.glob("*.so")):
        name = ext.name.split(".", 1)[0]
        try:
            needed += _loader_deps(staging, ext)
        except GuestError:
            if name in REQUIRED_EXTENSIONS:
                raise
            ext.unlink()  # a library it needs is not unpacked: leave the module out rather than ship it broken
    kept = {ext.name.split(".", 1)[0] for ext in dynload.glob("*.so")}
    missing = set(REQUIRED_EXTENSIONS) - kept
    if missing:
        raise GuestError(f"extension modules missing from libpython{PYTHON_VERSION}-stdlib: {sorted(missing)}")
    for lib in needed:
        dest = root / LIB_DIR / lib.name
        if not dest.exists():
            _copy_file(lib, dest, 0o755)
    _compile_stdlib(root)


def _compile_stdlib(root: Path) -> None:
    """Byte-compile the guest's standard library with the guest's own interpreter, and prove that it runs."""
    loader = root / "lib64" / LOADER
    python = [os.fspath(loader), "--library-path", os.fspath(root / LIB_DIR), os.fspath(root / "usr/bin/python3")]
    env = {"PYTHONHOME": os.fspath(root / "usr"), "PATH": "/usr/bin:/bin", "LC_ALL": "C"}
    stdlib = _stdlib(root)
    argv = [*python, "-m", "compileall", "-q", "-j", "0", "-d", f"/usr/lib/python{PYTHON_VERSION}"]
    argv += ["--invalidation-mode", "unchecked-hash", os.fspath(stdlib)]
    _run_env(argv, env)
    imports = ", ".join(REQUIRED_EXTENSIONS + ("json", "hashlib", "zipfile", "subprocess", "tempfile", "shutil"))
    _run_env([*python, "-c", f"import {imports}"], env)


def _run_env(argv: list[str], env: dict[str, str]) -> None:
    proc = subprocess.run(argv, env=env, capture_output=True, check=False)
    if proc.returncode != 0:
        raise GuestError(f"{' '.join(argv)} failed with {proc.returncode}: {proc.stderr.decode(errors='replace')}")


def build_python_guest(cache_dir: Path) -> GuestImage:
    """The tiny guest with /usr/bin/python3 (Debian's Python 3.11), built once into cache_dir like the tiny guest."""
    return build_tiny_guest(cache_dir, extra_packages=PYTHON_PACKAGES, customize=_add_python, variant=PYTHON_FORMAT)
