"""The record of published weights (timm_svb.hub.record): where it is written, entries validated on
write, concurrent writers locked out of each other."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest
from hub_helpers import (
    REPO_ROOT,
    _offline,  # noqa: F401  (autouse fixture)
    empty_record,
)
from recipe_helpers import one_thread  # noqa: F401  (autouse fixture)

from timm_svb.hub import record as hub_record
from timm_svb.hub.record import RecordError, read_record, record_path, write_record

ENTRY = {"hf_hub_id": "", "revision": "a" * 40, "sha256": "b" * 64, "metrics": {}, "svb_config": None}


def _write_entries(args: tuple[str, list[str]]) -> None:
    path, names = args
    for name in names:
        write_record(path, name, {**ENTRY, "hf_hub_id": f"timm-svb/{name}"})


@pytest.mark.slow
def test_concurrent_record_writes_keep_every_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = empty_record(tmp_path / "published.json")
    read = hub_record.read_record
    monkeypatch.setattr(hub_record, "read_record", lambda *a, **k: (read(*a, **k), time.sleep(0.02))[0])
    jobs = [(str(record), [f"convnet20.tag{p}_{i}" for i in range(6)]) for p in range(4)]
    with multiprocessing.get_context("fork").Pool(4) as pool:  # forked: the slowed read is inherited
        pool.map(_write_entries, jobs)
    assert len(read_record(record)) == 24


def test_record_path_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert record_path() == REPO_ROOT / "timm_svb" / "models" / "published.json"  # this source checkout
    installed = tmp_path / "lib" / "site-packages" / "timm_svb" / "models" / "published.json"
    with pytest.raises(RecordError, match="inside an installed package"):
        record_path(installed)
    monkeypatch.setattr(hub_record, "default_record_path", lambda: installed)
    with pytest.raises(RecordError, match="inside an installed package"):
        record_path()
    monkeypatch.setattr(hub_record, "default_record_path", lambda: tmp_path / "a" / "b" / "published.json")
    with pytest.raises(RecordError, match="not in a source checkout"):
        record_path()
    assert record_path(tmp_path / "mine.json") == (tmp_path / "mine.json").resolve()


def test_invalid_record_entries_are_refused_on_write(tmp_path: Path) -> None:
    record = empty_record(tmp_path / "published.json")
    good = {**ENTRY, "hf_hub_id": "timm-svb/convnet20.cifar10"}
    for bad, match in [
        ({**good, "revision": "main"}, "40-hex"),
        ({**good, "sha256": "deadbeef"}, "64 hex"),
        ({**good, "hf_hub_id": "timm-svb/convnet20.cifar10-test"}, "must be 'timm-svb/convnet20.cifar10'"),
    ]:
        with pytest.raises(RecordError, match=match):
            write_record(record, "convnet20.cifar10", bad)
    with pytest.raises(RecordError, match="SVB settings"):
        write_record(record, "convnet20_svb.cifar10", {**good, "hf_hub_id": "timm-svb/convnet20_svb.cifar10"})
    assert read_record(record) == {}
