"""A TCP proxy to a server (RabbitMQ by default) that a test can cut and restore: the server "goes
away" for one client without stopping the machine's server under every other test; and a free
port to listen on."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable


def free_port() -> int:
    """A port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def channel_open(data: bytes) -> bool:
    """Does this chunk from a client start with an AMQP Channel.Open? (a method frame: type 1,
    channel, size, then class 20 and method 10)"""
    return data[:1] == b"\x01" and data[7:11] == b"\x00\x14\x00\x0a"


class Proxy:
    def __init__(
        self, target_port: int = 5672, *, cut_on: Callable[[bytes], bool] | None = None
    ) -> None:
        """`cut_on`: the first time a client sends a chunk it matches, cut (the chunk never
        reaches RabbitMQ)."""
        self.port = free_port()
        self.target_port = target_port
        self.cut_on = cut_on
        self.tripped = asyncio.Event()
        self._cutting: asyncio.Task[None] | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def cut(self) -> None:
        """Stop listening and drop every open connection (like a broker that died)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)  # from the start: a cut while connecting upstream drops it
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            self._writers.discard(writer)
            return
        if writer.transport.is_closing():  # cut meanwhile
            up_writer.transport.abort()
            self._writers.discard(writer)
            return
        self._writers.add(up_writer)
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer, self.cut_on)),
            asyncio.create_task(self._pump(up_reader, writer, None)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
                self._tasks.discard(task)
            for w in (writer, up_writer):
                w.transport.abort()
                self._writers.discard(w)

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        cut_on: Callable[[bytes], bool] | None,
    ) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                if cut_on is not None and cut_on(data) and not self.tripped.is_set():
                    self.tripped.set()
                    self._cutting = asyncio.create_task(self.cut())  # cancels this pump too
                    return
                writer.write(data)
                await writer.drain()
