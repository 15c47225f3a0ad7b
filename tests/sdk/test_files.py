"""Files through the unmodified SDK: write, read, ranges, stat, ls, glob, grep."""

import pytest
from langsmith.sandbox import ResourceNotFoundError, SandboxOperationError

ROOT = "/tmp/ember-sdk-files"


def test_write_then_read_back_text_and_binary(sb):
    sb.write(f"{ROOT}/a.txt", "hello\nworld\n")
    assert sb.read(f"{ROOT}/a.txt") == b"hello\nworld\n"
    blob = bytes(range(256)) * 4096
    sb.write(f"{ROOT}/deep/er/blob.bin", blob)
    assert sb.read(f"{ROOT}/deep/er/blob.bin") == blob
    # Relative to /, so that the fake backend's host commands see the box's files too.
    seen = sb.run(f"cat .{ROOT}/a.txt", run_config={"work_dir": "/"})
    assert seen.stdout == "hello\nworld\n", "commands see what was written"


def test_a_file_far_larger_than_a_buffered_body_goes_up_whole(sb):
    blob = bytes(range(256)) * (96 << 12)  # 24 MiB
    sb.write(f"{ROOT}/large.bin", blob, timeout=300)
    assert sb.stat(f"{ROOT}/large.bin").size_bytes == len(blob)
    assert sb.read(f"{ROOT}/large.bin", timeout=300) == blob


def test_a_missing_file_is_not_found(sb):
    with pytest.raises(ResourceNotFoundError):
        sb.read(f"{ROOT}/missing")
    with pytest.raises(ResourceNotFoundError):
        sb.stat(f"{ROOT}/missing")


def test_stat_and_ranged_reads(sb):
    sb.write(f"{ROOT}/r.txt", "0123456789")
    stat = sb.stat(f"{ROOT}/r.txt")
    assert stat.size_bytes == 10 and stat.etag and stat.last_modified
    chunk = sb.read_range(f"{ROOT}/r.txt", start=2, end=4, if_range=stat.etag)
    assert (chunk.content, chunk.start, chunk.total_bytes, chunk.partial) == (b"234", 2, 10, True)
    assert sb.read_range(f"{ROOT}/r.txt", start=7).content == b"789"
    assert sb.read_range(f"{ROOT}/r.txt", suffix_bytes=3).content == b"789"
    assert sb.read_range(f"{ROOT}/r.txt", start=0, if_none_match=stat.etag).unchanged
    stale = sb.read_range(f"{ROOT}/r.txt", start=2, if_range='"stale"')
    assert (stale.partial, stale.content) == (False, b"0123456789"), "a stale If-Range gets the whole file"
    with pytest.raises(SandboxOperationError):
        sb.read_range(f"{ROOT}/r.txt", start=50)


def test_ls_glob_and_grep(sb):
    sb.write(f"{ROOT}/s/one.py", "import os\nprint('needle here')\n")
    sb.write(f"{ROOT}/s/two.txt", "no match\nneedle again\n")
    sb.write(f"{ROOT}/s/sub/three.py", "needle deep\n")
    listed = sb.ls(f"{ROOT}/s")
    assert sorted(m.path.rsplit("/", 1)[1] for m in listed) == ["one.py", "sub", "two.txt"]
    assert [m.is_dir for m in listed if m.path.endswith("/sub")] == [True]
    py = sb.glob("**/*.py", f"{ROOT}/s")
    assert sorted(m.path for m in py) == [f"{ROOT}/s/one.py", f"{ROOT}/s/sub/three.py"]
    assert not py.truncated
    hits = sb.grep("needle", f"{ROOT}/s")
    assert sorted((m.path, m.line) for m in hits) == [(f"{ROOT}/s/one.py", 2), (f"{ROOT}/s/sub/three.py", 1), (f"{ROOT}/s/two.txt", 2)]
    only_py = sb.grep("needle", f"{ROOT}/s", glob="*.py")
    assert sorted(m.text for m in only_py) == ["needle deep", "print('needle here')"]
    capped = sb.grep("needle", f"{ROOT}/s", limit=1)
    assert len(capped) == 1 and capped.truncated
