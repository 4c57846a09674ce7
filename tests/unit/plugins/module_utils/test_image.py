# Copyright (c) 2026, vmsnap.qemu contributors
# GNU General Public License v3.0+ (see LICENSES/GPL-3.0-or-later.txt or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later

from __future__ import annotations

import pytest

from ansible_collections.vmsnap.qemu.plugins.module_utils._image import metadata_update_reserve, parse_info


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
    with pytest.raises((ValueError, KeyError, TypeError)):
        parse_info(bad)


def test_metadata_reserve_grows_with_size_and_snapshots(recorded) -> None:
    plain = parse_info(recorded.json("info-plain-qcow2.json")).top
    base = parse_info(recorded.json("info-chain-top-over-base-with-snapshots-and-bitmap.json")).chain[1]
    assert metadata_update_reserve(plain) >= 6 * 65536
    assert metadata_update_reserve(base) >= metadata_update_reserve(plain)
