"""The embedded Redis's data folder and files are the user's alone (0700 / 0600), new or inherited."""

from __future__ import annotations

import stat
import time

from car_backend.queue.connection import connect
from tests.support.settings import tiny_settings


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_embedded_data_folder_and_its_files_are_private(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    old = folder / "left-by-an-older-version.aof"
    old.write_text("x")
    old.chmod(0o644)
    connection = connect(tiny_settings(redis_url="", data_dir=str(folder)))
    try:
        connection.redis.set("secret", "value")
        connection.redis.bgrewriteaof()  # redis-server writes new AOF files, with its own umask
        deadline = time.monotonic() + 20
        while connection.redis.info("persistence")["aof_rewrite_in_progress"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        files = [p for p in folder.rglob("*") if p.is_file()]
        folders = [p for p in folder.rglob("*") if p.is_dir()]
        assert any(".aof" in p.name for p in files if p != old), files  # redis-server's own AOF is there
        assert _mode(folder) == 0o700
        assert {p.name: _mode(p) for p in files} == {p.name: 0o600 for p in files}
        assert {p.name: _mode(p) for p in folders} == {p.name: 0o700 for p in folders}
    finally:
        connection.close()
