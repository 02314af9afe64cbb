"""The control machine's artifacts: one archive per artifact, byte-identical when its contents
are, so a re-run of the playbook copies nothing to the Pis."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

from appliance.control.artifacts import pack


def test_an_unchanged_directory_packs_to_the_same_untouched_archive(tmp_path: Path):
    house = tmp_path / "house"
    house.mkdir()
    (house / "b.whl").write_bytes(b"b")
    (house / "BUILD.json").write_text("{}")
    (house / "a.whl").write_bytes(b"a")
    (house / ".complete").write_text("")  # the cache's stamp stays out of the archive
    tarball = pack(house, tmp_path / "house.tar")
    os.utime(tarball, (0, 0))
    first = tarball.read_bytes()

    os.utime(house / "a.whl", (1e9, 1e9))  # a new mtime alone is no change
    assert pack(house, tarball) == tarball
    assert tarball.read_bytes() == first and tarball.stat().st_mtime == 0
    with tarfile.open(tarball) as archive:
        assert archive.getnames() == ["a.whl", "b.whl", "BUILD.json"]  # the stamp last
        assert {(m.mtime, m.uname) for m in archive.getmembers()} == {(0, "root")}

    (house / "a.whl").write_bytes(b"a, rebuilt")
    pack(house, tarball)
    assert tarball.read_bytes() != first
    assert not list(tmp_path.glob("*.partial"))
