# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

import dataclasses
import json
import re
import typing as t

import pytest

from ansible_collections.vmsnap.qemu.plugins.module_utils._errors import QemuImgError, VmsnapError
from ansible_collections.vmsnap.qemu.plugins.module_utils._image import (
    ImageDescriptionError,
    metadata_update_reserve,
    parse_info,
)
from ansible_collections.vmsnap.qemu.plugins.module_utils._qemu_img import QemuImg


def test_chain_is_parsed_top_first(recorded) -> None:
    info = parse_info(recorded.json("info-chain-top-over-base-with-snapshots-and-bitmap.json"))
    image = info.as_dict()
    assert image["filename"] == "/tmp/q/rec/top.qcow2"
    assert image["format"] == "qcow2"
    assert image["virtual_size"] == 64 * 1024 * 1024
    assert image["backing_file"] == "/tmp/q/rec/base.qcow2"
    assert image["backing_format"] == "qcow2"
    assert image["chain_depth"] == 1
    assert [layer["filename"] for layer in image["chain"]] == ["/tmp/q/rec/top.qcow2", "/tmp/q/rec/base.qcow2"]
    assert image["chain"][1]["backing_file"] is None
    # Snapshots and bitmaps are the top image's own; the base's are not the overlay's.
    assert image["snapshots"] == []
    assert image["bitmaps"] == []
    assert image["in_use"] is False


def test_snapshots_and_bitmaps_of_a_layer(recorded) -> None:
    base = parse_info(recorded.json("info-chain-top-over-base-with-snapshots-and-bitmap.json")).chain[1]
    assert [(s.id, s.name) for s in base.snapshots] == [("1", "pre-upgrade"), ("2", "dup"), ("3", "dup"), ("4", "7")]
    first = base.snapshots[0].as_dict()
    assert first["vm_state_size"] == 0
    assert first["date"].endswith("Z") and first["date"].startswith("2026-")
    assert first["date_epoch"] == pytest.approx(1795790005, abs=3600 * 24 * 365)
    assert [b.as_dict() for b in base.bitmaps] == [{"name": "bm0", "granularity": 65536, "flags": ["auto"]}]


def test_iso_date_is_utc() -> None:
    info = parse_info(
        {
            "filename": "/x.qcow2",
            "format": "qcow2",
            "virtual-size": 1,
            "snapshots": [
                {"id": "1", "name": "a", "date-sec": 0, "date-nsec": 5, "vm-clock-sec": 61, "vm-clock-nsec": 500000000}
            ],
        }
    )
    snap = info.snapshots[0].as_dict()
    assert snap["date"] == "1970-01-01T00:00:00Z"
    assert snap["vm_clock"] == pytest.approx(61.5)


def test_single_document_and_raw(recorded) -> None:
    plain = parse_info(recorded.json("info-plain-qcow2.json"))
    assert plain.as_dict()["chain_depth"] == 0
    assert plain.top.cluster_size == 65536
    raw = parse_info(recorded.json("info-raw.json"), in_use=True)
    assert raw.top.format == "raw"
    assert raw.top.cluster_size is None
    assert raw.as_dict()["in_use"] is True


@pytest.mark.parametrize("bad", [[], {}, [1], "text", [{"filename": "x"}]])
def test_malformed_json_raises(bad) -> None:
    with pytest.raises(ImageDescriptionError):
        parse_info(bad)


def test_metadata_reserve_grows_with_size_and_snapshots(recorded) -> None:
    plain = parse_info(recorded.json("info-plain-qcow2.json")).top
    base = parse_info(recorded.json("info-chain-top-over-base-with-snapshots-and-bitmap.json")).chain[1]
    assert metadata_update_reserve(plain) >= 6 * 65536
    assert metadata_update_reserve(base) >= metadata_update_reserve(plain)


# ---------------------------------------------------------------------------------------------------------------
# Recorded qemu-img outputs altered: every key dropped, nulled or given an odd value. Parsing either yields a sane
# model or raises the collection's ImageDescriptionError (a VmsnapError); never KeyError, TypeError, AttributeError,
# OverflowError or RecursionError.

RECORDINGS = ["info-chain-top-over-base-with-snapshots-and-bitmap.json", "info-plain-qcow2.json", "info-raw.json"]


def _deep(levels: int) -> list:
    value: list = []
    for dummy in range(levels):
        value = [value]
    return value


ODD_VALUES = [
    None,
    "",
    "x",
    -1,
    0,
    2**70,
    -(2**70),
    1.5,
    True,
    False,
    [],
    {},
    [1, "a"],
    {"a": {"b": []}},
    _deep(20000),
]


def _paths(value: t.Any, path: tuple = ()) -> t.Iterator[tuple]:
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, path + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, path + (index,))


def _altered(document: t.Any, path: tuple, value: t.Any, drop: bool) -> t.Any:
    copy = json.loads(json.dumps(document))
    if not path:
        return value
    parent = copy
    for step in path[:-1]:
        parent = parent[step]
    if drop:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return copy


def _parse_sanely(data: t.Any) -> None:
    try:
        info = parse_info(data)
    except ImageDescriptionError as exc:
        assert isinstance(exc, VmsnapError) and exc.msg.startswith("Unexpected image description from qemu-img")
        assert len(exc.msg) < 300  # names the key and the type, never the (possibly huge or deep) value
        return
    # Whatever is accepted must also be usable: the module's result, the space planning, the dates.
    json.dumps(info.as_dict())
    metadata_update_reserve(info.top)
    for layer in info.chain:
        assert layer.virtual_size >= 0 and (layer.cluster_size is None or layer.cluster_size > 0)
        assert all(isinstance(snap.id, str) and isinstance(snap.name, str) for snap in layer.snapshots)


@pytest.mark.parametrize("name", RECORDINGS)
def test_every_key_dropped_or_odd_gives_a_model_or_the_error_family(recorded, name: str) -> None:
    document = recorded.json(name)
    cases = 0
    for path in _paths(document):
        if path:
            _parse_sanely(_altered(document, path, None, drop=True))
            cases += 1
        for value in ODD_VALUES:
            _parse_sanely(_altered(document, path, value, drop=False))
            cases += 1
    assert cases > 100


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda doc: doc.pop("filename"), "'filename' is missing"),
        (lambda doc: doc.update({"virtual-size": "64M"}), "'virtual-size' is a str, not a int"),
        (lambda doc: doc.update({"virtual-size": -1}), "'virtual-size' is below 0"),
        (lambda doc: doc.update({"dirty-flag": "no"}), "'dirty-flag' is a str, not a bool"),
        (lambda doc: doc.update({"cluster-size": 0}), "'cluster-size' is below 1"),
        (lambda doc: doc.update({"snapshots": {"id": "1"}}), "'snapshots' is a dict, not a list"),
        (lambda doc: doc.update({"snapshots": [{"id": 1, "name": "a"}]}), "'id' is a int, not a str"),
        (lambda doc: doc.update({"snapshots": [{"id": "1", "name": "a", "date-sec": 2**40}]}), "beyond the year"),
        (lambda doc: doc.update({"snapshots": [{"id": "1", "name": "a", "vm-state-size": -5}]}), "below 0"),
        (lambda doc: doc.update({"snapshots": ["1"]}), "a snapshot is not an object"),
        (lambda doc: doc.update({"format-specific": {"data": {"bitmaps": [{"name": "b", "flags": [1]}]}}}), "flags"),
        (lambda doc: doc.update({"filename": _deep(20000)}), "'filename' is a list, not a str"),
    ],
)
def test_odd_fields_are_named_in_the_message(recorded, change: t.Callable, key: str) -> None:
    document = recorded.json("info-plain-qcow2.json")
    change(document)
    with pytest.raises(ImageDescriptionError, match=re.escape(key)):
        parse_info(document)


def test_deeply_nested_documents_do_not_recurse() -> None:
    for data in (_deep(20000), [{"filename": "/x", "format": "qcow2", "virtual-size": 1, "snapshots": _deep(20000)}]):
        with pytest.raises(ImageDescriptionError):
            parse_info(data)


def test_odd_info_json_through_the_runner_is_a_qemu_img_error(recorded) -> None:
    """What a module sees: QemuImgError naming the image, not a traceback."""
    document = recorded.json("info-plain-qcow2.json")
    document["snapshots"] = [{"name": "no id"}]

    class Fake:
        def get_bin_path(self, name: str, required: bool = False) -> str:
            return "/usr/bin/" + name

        def __call__(self, args: list[str], *rest: t.Any, **kwargs: t.Any) -> tuple[int, str, str]:
            return 0, json.dumps(document), ""

    fake = Fake()
    with pytest.raises(QemuImgError, match="Unexpected qemu-img info JSON for /x.qcow2: .*'id' is missing"):
        QemuImg(fake, execute=fake).info("/x.qcow2")


def test_metadata_reserve_survives_odd_cluster_sizes(recorded) -> None:
    plain = parse_info(recorded.json("info-plain-qcow2.json")).top
    for cluster in (1, 7, 8, 511):
        assert metadata_update_reserve(dataclasses.replace(plain, cluster_size=cluster)) > 0
