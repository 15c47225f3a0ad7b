"""Commands through the unmodified SDK: results, streaming, stdin, kill, timeouts, and a
command that runs on while its client is away, then reconnects."""

import gc
import time

import pytest
from langsmith.sandbox import CommandTimeoutError, SandboxConnectionError, SandboxOperationError


def test_a_command_has_its_stdout_stderr_and_exit_code(sb):
    result = sb.run("echo out; echo err >&2; exit 3")
    assert (result.stdout, result.stderr, result.exit_code) == ("out\n", "err\n", 3)
    assert not result.success
    assert sb.run("true").success


def test_environment_and_working_directory_reach_the_command(sb):
    sb.write("/tmp/ember-sdk-cwd/marker", "")
    result = sb.run("echo $GREETING; pwd", run_config={"env_vars": {"GREETING": "hi"}, "work_dir": "/tmp/ember-sdk-cwd"})
    assert result.stdout.splitlines()[0] == "hi"
    assert result.stdout.splitlines()[1].endswith("/tmp/ember-sdk-cwd")


def test_output_streams_chunk_by_chunk(sb):
    handle = sb.run("for i in 1 2 3; do echo line$i; sleep 0.3; done; echo gone >&2", wait=False)
    assert handle.command_id and handle.pid
    chunks = list(handle)
    stdout = "".join(c.data for c in chunks if c.stream == "stdout")
    assert stdout == "line1\nline2\nline3\n"
    assert len([c for c in chunks if c.stream == "stdout"]) >= 3, "each line came as it was written"
    assert [c.offset for c in chunks if c.stream == "stdout"][:2] == [0, 6]
    assert handle.result.stderr == "gone\n"
    seen = []
    sb.run("echo a; sleep 0.2; echo b", on_stdout=seen.append)
    assert "".join(seen) == "a\nb\n"


def test_unicode_output_keeps_its_characters_and_offsets(sb):
    handle = sb.run("printf 'h\\xc3\\xa9llo \\xe2\\x82\\xac\\n'", wait=False)
    result = handle.result
    assert result.stdout == "héllo €\n"
    assert handle.last_stdout_offset == len("héllo €\n".encode())


def test_stdin_goes_to_the_command(sb):
    handle = sb.run("cat; echo done", wait=False, close_input=False)
    handle.send_input("hello\n")
    handle.send_input("world\n")
    handle.close_input()
    assert handle.result.stdout == "hello\nworld\ndone\n"


def test_stdin_is_closed_by_default(sb):
    started = time.monotonic()
    assert sb.run("cat; echo eof", timeout=20).stdout == "eof\n"
    assert time.monotonic() - started < 10


def test_kill_ends_the_command_and_its_end_is_kept(sb):
    handle = sb.run("echo up; sleep 60", wait=False)
    command_id = handle.command_id
    stream = iter(handle)
    assert next(stream).data == "up\n"
    handle.kill()
    with pytest.raises(SandboxConnectionError):
        list(stream)
    result = sb.reconnect(command_id).result
    assert result.exit_code == 137
    assert result.stdout == "up\n"


def test_a_command_runs_on_without_its_client_and_reconnect_resumes(sb):
    handle = sb.run("echo first; sleep 1; echo second; echo tail >&2", wait=False)
    command_id = handle.command_id
    stream = iter(handle)
    first = next(stream)
    assert (first.stream, first.data) == ("stdout", "first\n")
    offset = handle.last_stdout_offset
    del stream, handle
    gc.collect()  # the handle's WebSocket closes with it
    time.sleep(2)  # the command ends while nobody is attached
    resumed = sb.reconnect(command_id, stdout_offset=offset)
    result = resumed.result
    assert (result.stdout, result.stderr, result.exit_code) == ("second\n", "tail\n", 0)
    again = sb.reconnect(command_id).result
    assert again.stdout == "first\nsecond\n", "a reconnect from 0 replays everything kept"


def test_reconnect_to_an_unknown_command_is_refused(sb):
    with pytest.raises(SandboxOperationError) as e:
        sb.reconnect("0123456789abcdef").result
    assert e.value.error_type == "CommandNotFound"


def test_a_command_past_its_timeout_is_killed(sb):
    started = time.monotonic()
    with pytest.raises(CommandTimeoutError):
        sb.run("sleep 30", timeout=1)
    assert time.monotonic() - started < 10


def test_a_missing_shell_is_an_operation_error(sb):
    with pytest.raises(SandboxOperationError):
        sb.run("true", shell="/nonexistent/shell")


def test_large_output_arrives_whole(sb):
    result = sb.run("head -c 3000000 /dev/zero | tr '\\0' 'x'; echo")
    assert len(result.stdout) == 3_000_001 and set(result.stdout[:-1]) == {"x"}


def test_the_sse_transport_runs_and_resumes_commands(sb, monkeypatch):
    monkeypatch.setenv("LANGSMITH_FEATURES", "sandbox_sse_exec")
    result = sb.run("echo over sse; echo e >&2; exit 4")
    assert (result.stdout, result.stderr, result.exit_code) == ("over sse\n", "e\n", 4)
    big = sb.run("head -c 3000000 /dev/zero | tr '\\0' 'y'")
    assert len(big.stdout) == 3_000_000, "output past the server's buffer comes through ack_required and resume"
    handle = sb.run("echo a; sleep 0.5; echo b", wait=False)
    assert sb.reconnect(handle.command_id).result.stdout == "a\nb\n"
