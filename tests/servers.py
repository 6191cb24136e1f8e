"""Real redis-server and nats-server processes on free ports, for tests that kill and restart them."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from .helpers import free_port, wait_for


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class _ServerBase:
    binary = ""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = Path(tempfile.mkdtemp(prefix=f"herald-{self.binary}-"))
        self.log_path = self.dir / "server.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def is_ready(self) -> bool:
        return _port_open(self.port)

    def start(self, timeout: float = 10.0) -> _ServerBase:
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, cwd=self.dir)

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.binary} exited:\n{self.log()}")
            return self.is_ready()

        wait_for(ready, timeout, what=f"{self.binary} on port {self.port}")
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL and wait until the port is free (a restart reuses it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        wait_for(lambda: not _port_open(self.port), 5, what="port released")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def restart(self) -> None:
        self.kill()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisServer(_ServerBase):
    """``redis-server``; without ``persistent`` a restart comes back empty.

    With ``persistent`` every write goes to an append-only file in the server's
    directory before it is acknowledged (``appendfsync always``), so even a
    SIGKILL and restart brings every acknowledged write back.  ``extra`` arguments
    come last (so they win), and are read again at each (re)start.
    """

    binary = "redis-server"

    def __init__(
        self, port: int | None = None, *, persistent: bool = False, extra: list[str] | None = None
    ) -> None:
        super().__init__(port)
        self.persistent = persistent
        self.extra = extra or []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        return [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--save",
            "",
            "--appendonly",
            "yes" if self.persistent else "no",
            "--appendfsync",
            "always",
            "--dir",
            str(self.dir),
            *self.extra,
        ]

    def is_ready(self) -> bool:
        return _redis_ping(self.port)


class NatsServer(_ServerBase):
    """``nats-server``, with JetStream (storage in a temp dir) when ``jetstream``."""

    binary = "nats-server"

    def __init__(self, port: int | None = None, *, jetstream: bool = False) -> None:
        super().__init__(port)
        self.jetstream = jetstream

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = ["nats-server", "-a", "127.0.0.1", "-p", str(self.port)]
        if self.jetstream:
            cmd += ["-js", "-sd", str(self.dir / "js")]
        return cmd


def require(binary: str) -> None:
    if shutil.which(binary) is None:
        pytest.skip(f"{binary} is not installed (scripts/test installs it with apt-get)")


def redis_server_fixture(*, persistent: bool = False) -> Iterator[RedisServer]:
    require("redis-server")
    server = RedisServer(persistent=persistent)
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


def nats_server_fixture(jetstream: bool = False) -> Iterator[NatsServer]:
    require("nats-server")
    server = NatsServer(jetstream=jetstream)
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


class RedisClusterServers:
    """A real Redis Cluster of ``masters`` masters, each with ``replicas`` replicas, on
    free ports, each node in its own temp dir.  ``cluster-require-full-coverage no``:
    while one master is down the others keep serving their slots (see docs/scaling.md,
    Redis Cluster).  With replicas, a master killed is failed over to its replica after
    the node timeout (2 s)."""

    def __init__(self, masters: int = 3, replicas: int = 0) -> None:
        self.replicas = replicas
        self.nodes = [_ClusterNode() for _ in range(masters * (1 + replicas))]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)

    def start(self) -> RedisClusterServers:
        for node in self.nodes:
            node.start()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=30,
        )  # fmt: skip
        self.wait_ok()
        if self.replicas:
            wait_for(
                lambda: (
                    sum(b"master_link_status:up" in node.info(b"replication") for node in self.nodes)
                    == len(self.nodes) // (1 + self.replicas) * self.replicas
                ),
                60,
                what="every replica in sync with its master",
            )
        return self

    def wait_ok(self, timeout: float = 20.0) -> None:
        """Until every running node answers ``cluster_state:ok`` (all slots served)."""
        wait_for(
            lambda: all(node.cluster_ok() for node in self.nodes if node.running),
            timeout,
            what="cluster_state:ok",
        )

    def node_on(self, port: int) -> _ClusterNode:
        """The node listening on ``port``."""
        return next(node for node in self.nodes if node.port == port)

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()


class _ClusterNode(RedisServer):
    def __init__(self) -> None:
        super().__init__()
        # Its own free bus port: the default (port + 10000) may be taken or above 65535.
        self.bus_port = free_port()

    def command(self) -> list[str]:
        return [
            *super().command(),
            "--cluster-enabled",
            "yes",
            "--cluster-port",
            str(self.bus_port),
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "2000",
            "--cluster-require-full-coverage",
            "no",
        ]

    def cluster_ok(self) -> bool:
        return b"cluster_state:ok" in self._ask(b"CLUSTER INFO")

    def info(self, section: bytes) -> bytes:
        """``INFO section``'s text (empty when the node does not answer)."""
        return self._ask(b"INFO " + section)

    def _ask(self, command: bytes) -> bytes:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(command + b"\r\n")
                return sock.recv(8192)
        except OSError:
            return b""


def redis_cluster_fixture(masters: int = 3, replicas: int = 0) -> Iterator[RedisClusterServers]:
    require("redis-server")
    require("redis-cli")
    cluster = RedisClusterServers(masters, replicas)
    try:
        yield cluster.start()
    finally:
        cluster.cleanup()
