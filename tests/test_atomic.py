"""Atomic writes: a failed write leaves the previous file as it was."""

import pytest

from edge_runtime.atomic import write_bytes_atomic, write_text_atomic


def test_replaces_content_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "state" / "file.bin"
    write_bytes_atomic(target, b"old")
    write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == ["file.bin"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    write_text_atomic(target, "good")

    def broken_fsync(_fd):
        raise OSError("disk full")

    monkeypatch.setattr("edge_runtime.atomic.os.fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(target, "half-written")
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_new_files_are_readable_by_other_users_and_modes_are_kept(tmp_path):
    fresh = tmp_path / "bundle.json"
    write_text_atomic(fresh, "{}")
    assert fresh.stat().st_mode & 0o777 == 0o644
    fresh.chmod(0o600)
    write_text_atomic(fresh, "{\"v\": 2}")
    assert fresh.stat().st_mode & 0o777 == 0o600
