"""The floor of any relay, scenario 8's reference path (f): bytes spliced both ways.

Not an HTTP server: each connection it accepts gets one connection to the upstream, and
whatever either side sends is written to the other as it arrives (no parsing, no pool,
no checks). What it costs is the cost of one more process and two more sockets on the
request's way, which no relay avoids. `python -m benchmarks.reference_splice UPSTREAM_PORT
PORT`, on uvloop as the worker's servers are.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

import uvloop


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(1 << 16):
            writer.write(data)
    writer.close()


async def serve(upstream: int, port: int) -> None:
    async def splice(client: asyncio.StreamReader, back: asyncio.StreamWriter) -> None:
        server, forth = await asyncio.open_connection("127.0.0.1", upstream)
        await asyncio.gather(pipe(client, forth), pipe(server, back))

    async with await asyncio.start_server(splice, "127.0.0.1", port) as listening:
        await listening.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), int(sys.argv[2])))
