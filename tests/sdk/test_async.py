"""The async client against the same server."""

import asyncio

from conftest import CREATE_TIMEOUT


def test_the_async_client_creates_runs_streams_and_moves_files(server):
    async def scenario():
        async with server.async_client() as client:
            sb = await client.create_sandbox(snapshot=server.snapshot, timeout=CREATE_TIMEOUT)
            try:
                result = await sb.run("echo async; exit 2")
                assert (result.stdout, result.exit_code) == ("async\n", 2)
                handle = await sb.run("echo a; sleep 0.2; echo b", wait=False)
                chunks = [c.data async for c in handle]
                assert "".join(chunks) == "a\nb\n"
                handle = await sb.run("cat", wait=False, close_input=False)
                await handle.send_input("in\n")
                await handle.close_input()
                assert (await handle.result).stdout == "in\n"
                await sb.write("/tmp/ember-sdk-async/f", b"bytes")
                assert await sb.read("/tmp/ember-sdk-async/f") == b"bytes"
                assert [b.name for b in await client.list_sandboxes()].count(sb.name) == 1
            finally:
                await client.delete_sandbox(sb.name)

    asyncio.run(scenario())
