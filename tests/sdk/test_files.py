"""Files through the unmodified SDK: write, read, ranges, stat, ls, glob, grep, download links."""

import pytest
import requests
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


def test_a_download_link_serves_its_file_to_anyone_without_a_key(sb):
    sb.write(f"{ROOT}/report.txt", "0123456789")
    link = sb.generate_download_url(f"{ROOT}/report.txt", content_type="text/plain", content_disposition="attachment")
    assert link.token in link.download_url and link.expires_at is None
    r = requests.get(link.download_url, timeout=30)
    assert (r.status_code, r.content) == (200, b"0123456789")
    assert r.headers["content-type"] == "text/plain"
    assert r.headers["content-disposition"].startswith('attachment; filename="report.txt"')
    part = requests.get(link.download_url, headers={"Range": "bytes=2-4"}, timeout=30)
    assert (part.status_code, part.content, part.headers["content-range"]) == (206, b"234", "bytes 2-4/10")
    head = requests.head(link.download_url, timeout=30)
    assert (head.status_code, head.headers["content-length"], head.content) == (200, "10", b"")


def test_a_download_link_with_a_tampered_token_or_past_its_expiry_is_refused(sb):
    sb.write(f"{ROOT}/t.txt", "secret")
    link = sb.generate_download_url(f"{ROOT}/t.txt", expires_in_seconds=600)
    assert link.expires_at
    last = link.token[-1]
    tampered = link.download_url.replace(link.token, link.token[:-1] + ("0" if last != "0" else "1"))
    r = requests.get(tampered, timeout=30)
    assert r.status_code == 401 and b"secret" not in r.content
    assert requests.get(link.download_url.rsplit("/", 1)[0] + "/other.txt", timeout=30).status_code == 401
    with pytest.raises(ValueError):
        sb.generate_download_url(f"{ROOT}/t.txt", expires_in_seconds=0)


def test_another_tenant_mints_no_download_link(server, sb):
    with server.client(server.other_key) as other:
        with pytest.raises(ResourceNotFoundError):
            other.generate_download_url(sb.name, "/etc/hostname")
