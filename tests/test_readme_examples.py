"""The README's examples run, as written, against ``herald serve`` on its shipped defaults.

Every ``console``, ``sh`` and ``bash`` block of README.md is read; every command in it is
run against one real server (started here on a free port with no setting changed: the
demos' namespaces ``chat``, ``dashboard`` and ``game`` plus the default one), in the
order of the page, with ``:8000`` rewritten to the server's port:

* ``herald connect URL`` is interactive: the lines of its transcript without ``<`` are
  typed on its stdin, one at a time, and every line it prints is compared with the
  transcript's next output line (``<`` lines, ``Connected to ...``, ``Disconnected ...``).
  ``wscat -c URL`` transcripts (``> typed``, ``< received``) are replayed with ``herald
  connect URL``, the same raw exchange (wscat is a Node tool Herald does not install).
* every other command runs in ``bash`` with a timeout and must exit with status 0; where
  the page shows its output, the output must match; a ``curl`` that shows none must
  answer JSON without an error ``detail``.
* client ids, epochs and the version differ between runs: they are compared as
  placeholders.

A command that cannot run in a test is listed in :data:`SKIPPED`, with the reason; every
other command, including one added to the README later, runs.  The channels the README
names must exist on the default server (issue 17 item 10: ``dm:chat#alice,bob`` named a
namespace no default server has).

The pages of docs/ in :data:`DOC_PAGES` run the same way, with the settings the page
assumes (http-api.md: the API key ``docs-key``).  Their outputs belong to a longer story
(alice connected, offsets 4 and 5), so only their shape is compared: the same top-level
keys and exactly the documented error codes, in order.  The other pages' commands are
not run: multi-terminal walk-throughs with tokens (clients.md, protocol.md), servers
with brokers or files the test does not have (configuration.md, scaling.md, security.md),
installs and benchmarks (benchmarks.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shlex
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from .helpers import DEFAULT_TIMEOUT, ROOT, ServerProcess, http_get

README = ROOT / "README.md"
#: docs/ pages whose commands run, with the settings each assumes.
DOC_PAGES = {"docs/http-api.md": {"HERALD_API_KEY": "docs-key"}}
#: The epoch the docs' examples show for chat:lobby: replaced with the server's.
SAMPLE_EPOCH = "c9670d3d"
VENV_BIN = ROOT / ".venv" / "bin"
#: The port the README's commands name.
DOC_PORT = 8000
#: Seconds one command may take.
COMMAND_TIMEOUT = 15.0

#: Commands (by how they start) that cannot run in a test, and why.  Any other command of
#: a README shell block runs; an entry that matches no command fails the test (stale).
SKIPPED = {
    "./scripts/serve": "creates .venv, installs Herald and serves until stopped: the test starts the server",
    "./scripts/test": "the whole test suite (pip, apt-get, every test)",
    "herald serve --workers 4 --broker redis://": "starts 4 workers on a Redis server at localhost:6379",
}

#: Lines ``herald connect`` prints in raw mode besides ``< message`` lines.
CLI_OUTPUT = re.compile(r"^(< |Connected to |Disconnected\b)")
#: Values that differ between runs: client ids (16 hex digits), epochs (8 hex digits and
#: an optional ``.generation``), the version in the connect reply.
VARIABLE = [
    (re.compile(r"\b[0-9a-f]{16}\b"), "<client>"),
    (re.compile(r"\b[0-9a-f]{8}(?:\.\d+)?\b"), "<epoch>"),
    (re.compile(r'"version":"[^"]*"'), '"version":"<version>"'),
]
#: A channel name anywhere in the page (prose, code, commands): ``namespace:name``, not
#: part of a URL, a module path (``herald.server:app``) or ``host:port``.
CHANNEL = re.compile(r"(?<![\w.:/@-])([a-z][a-z0-9_-]*:(?!//)[A-Za-z0-9_.@=,#!~-]*[A-Za-z0-9_@=#!~-])")
#: Matches of CHANNEL that are no channel: the placeholder in a code comment.
NOT_CHANNELS = {"namespace:name"}


@dataclass
class Command:
    """One command of a shell block: what is typed after ``$``, and the lines after it."""

    line: int
    text: str
    transcript: list[str] = field(default_factory=list)
    shows_output: bool = False
    page: str = "README.md"

    @property
    def interactive(self) -> bool:
        return self.text.startswith(("herald connect ", "wscat "))

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {self.text}"


def strip_comment(line: str) -> str:
    """``cmd   # why`` -> ``cmd`` (a ``#`` after a space and before one starts a comment)."""
    return re.sub(r"\s+#\s.*$", "", line).rstrip()


def shell_blocks(markdown: str) -> Iterator[tuple[str, int, list[str]]]:
    """(language, line of the first body line, body lines) of every shell block."""
    lines = markdown.splitlines()
    index = 0
    while index < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[index])
        if fence is None:
            index += 1
            continue
        end = index + 1
        while end < len(lines) and not lines[end].startswith("```"):
            end += 1
        if fence.group(1) in ("console", "sh", "bash", "shell"):
            yield fence.group(1), index + 2, lines[index + 1 : end]
        index = end + 1


def commands(markdown: str, page: str = "README.md") -> list[Command]:
    """The commands of every shell block, in the page's order.

    ``console`` blocks: ``$ `` starts a command (a line ending in ``\\`` goes on), the
    lines after it up to the next ``$ `` or blank line are its transcript or output.
    ``sh`` blocks: every line is a command (comments dropped)."""
    found: list[Command] = []
    for language, first, body in shell_blocks(markdown):
        current: Command | None = None
        continuing = False
        for offset, raw in enumerate(body):
            if continuing and current is not None:
                current.text = current.text[:-1].rstrip() + " " + strip_comment(raw.strip())
                continuing = current.text.endswith("\\")
                continue
            if language == "console":
                if raw.startswith("$ "):
                    current = Command(first + offset, strip_comment(raw[2:]), shows_output=True, page=page)
                    found.append(current)
                    continuing = current.text.endswith("\\")
                elif not raw.strip():
                    current = None
                elif current is not None:
                    current.transcript.append(raw)
            elif raw.strip() and not raw.lstrip().startswith("#"):
                current = Command(first + offset, strip_comment(raw), page=page)
                found.append(current)
                continuing = current.text.endswith("\\")
    return found


def skip_reason(command: Command) -> str | None:
    return next((why for start, why in SKIPPED.items() if command.text.startswith(start)), None)


def normalize(line: str) -> str:
    for pattern, placeholder in VARIABLE:
        line = pattern.sub(placeholder, line)
    return line.rstrip()


class Runner:
    """Runs README commands against ``server`` (a subprocess per command)."""

    def __init__(self, server: ServerProcess, *, exact: bool = True) -> None:
        self.port = server.port
        self.http = server.http
        self.api_key = server.env.get("HERALD_API_KEY", "")
        #: Compare outputs line by line (else their shape, see :func:`shape`).
        self.exact = exact
        env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
        env.update(
            PATH=f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",
            HERALD_URL=server.http,  # where herald publish/history/presence go
            PYTHONUNBUFFERED="1",
        )
        self.env = env

    def localize(self, text: str) -> str:
        """The README's ``localhost:8000`` / ``127.0.0.1:8000`` -> the test server's port."""
        return re.sub(rf"\b(localhost|127\.0\.0\.1):{DOC_PORT}\b", rf"\1:{self.port}", text)

    def documented(self, text: str) -> str:
        """The other way round, for comparing output with the page."""
        return re.sub(rf"\b(localhost|127\.0\.0\.1):{self.port}\b", rf"\1:{DOC_PORT}", text)

    def run(self, command: Command) -> None:
        if command.interactive:
            self.converse(command)
        else:
            self.execute(command)

    def execute(self, command: Command) -> None:
        text = self.localize(command.text)
        if SAMPLE_EPOCH in text:
            text = text.replace(SAMPLE_EPOCH, self.epoch("chat:lobby"))
        result = subprocess.run(
            ["bash", "-c", text],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT,
            cwd=ROOT,
        )
        output = result.stdout.strip()
        assert result.returncode == 0, f"{command}\nexit {result.returncode}\n{result.stdout}{result.stderr}"
        if command.transcript and not self.exact:
            expected = json.loads("".join(line.strip() for line in command.transcript))
            assert shape(json.loads(output)) == shape(expected), f"{command}\n{output}"
        elif command.transcript:
            got = [normalize(self.documented(line)) for line in output.splitlines()]
            assert got == [normalize(line) for line in command.transcript], f"{command}\n{output}"
        elif command.text.startswith("curl "):
            answer = json.loads(output)
            assert not (isinstance(answer, dict) and "detail" in answer), f"{command}\n{output}"

    def epoch(self, channel: str) -> str:
        query = urllib.parse.urlencode({"channel": channel, "limit": 1})
        request = urllib.request.Request(
            f"{self.http}/api/history?{query}", headers={"X-API-Key": self.api_key}
        )
        with urllib.request.urlopen(request, timeout=DEFAULT_TIMEOUT) as response:
            return str(json.loads(response.read())["epoch"])

    def converse(self, command: Command) -> None:
        """Type the transcript's input lines into ``herald connect``; compare what it prints."""
        text = command.text
        wscat = text.startswith("wscat ")
        if wscat:
            words = shlex.split(text)
            assert words[:2] == ["wscat", "-c"], f"{command}: only `wscat -c URL` is replayed"
            text = f"herald connect {shlex.quote(words[2])}"
        process = subprocess.Popen(
            shlex.split(self.localize(text)),
            env=self.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )
        assert process.stdin is not None and process.stdout is not None
        printed: queue.Queue[str | None] = queue.Queue()
        reader = threading.Thread(target=_pump, args=(process.stdout, printed), daemon=True)
        reader.start()
        seen: list[str] = []
        try:
            steps = command.transcript
            if not steps:
                # Nothing shown: it must connect (protocol mode: and subscribe), then quit on EOF.
                steps = ["* subscribed to "] if "--channel" in text else ["Connected to "]
                expect_prefix = True
            else:
                expect_prefix = False
            for step in steps:
                if wscat:
                    typed = step[2:] if step.startswith("> ") else None
                else:
                    typed = None if CLI_OUTPUT.match(step) or expect_prefix else step
                if typed is not None:
                    process.stdin.write(typed + "\n")
                    process.stdin.flush()
                    continue
                # wscat prints only messages: herald connect's own lines are passed over.
                prefix = step if expect_prefix else "< " if wscat else None
                line = self._next_line(printed, seen, command, prefix)
                if not expect_prefix:
                    assert normalize(self.documented(line)) == normalize(step), (
                        f"{command}\nexpected: {step}\nprinted:  {line}\nso far: {seen}"
                    )
            with contextlib.suppress(BrokenPipeError):
                process.stdin.close()
            returncode = process.wait(COMMAND_TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(5)
            reader.join(DEFAULT_TIMEOUT)
            process.stdout.close()
        if expect_prefix:
            assert returncode == 0, f"{command}: exit {returncode}\n{seen}"

    @staticmethod
    def _next_line(
        printed: queue.Queue[str | None], seen: list[str], command: Command, prefix: str | None
    ) -> str:
        """The next line printed (with ``prefix``: the next line that starts with it)."""
        deadline = time.monotonic() + DEFAULT_TIMEOUT
        while True:
            try:
                line = printed.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(
                    f"{command}: nothing printed in {DEFAULT_TIMEOUT} s; so far {seen}"
                ) from None
            if line is None:
                raise AssertionError(f"{command}: it exited; printed {seen}")
            seen.append(line)
            if prefix is None or line.startswith(prefix):
                return line


def shape(answer: object) -> tuple[object, list[object]]:
    """What the docs' example answers are compared on: the top-level keys, and every error
    code in the answer in order (``detail.code``, ``results[].error.code``, the ``type`` of
    each validation error)."""
    codes: list[object] = []

    def walk(value: object) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key in ("error", "detail") and isinstance(item, dict):
                    codes.append(item.get("code"))
                elif key == "detail" and isinstance(item, list):
                    codes.extend(entry.get("type") for entry in item if isinstance(entry, dict))
                elif key == "error" and item is None:
                    codes.append(None)
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(answer)
    keys = sorted(answer) if isinstance(answer, dict) else type(answer).__name__
    return keys, codes


def _pump(stream: object, lines: queue.Queue[str | None]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        lines.put(line.rstrip("\n"))
    lines.put(None)


@pytest.fixture(scope="module")
def default_server() -> Iterator[ServerProcess]:
    """``herald serve`` with nothing configured (the helpers' test namespaces removed too)."""
    server = ServerProcess()
    server.env = {k: v for k, v in server.env.items() if not k.startswith("HERALD_")}
    server.env["HERALD_LOG_LEVEL"] = "warning"
    server.start()
    yield server
    server.stop()


README_COMMANDS = commands(README.read_text())


def test_the_readme_has_commands_and_the_skip_list_is_current() -> None:
    assert len(README_COMMANDS) >= 10, README_COMMANDS
    stale = [start for start in SKIPPED if not any(c.text.startswith(start) for c in README_COMMANDS)]
    assert not stale, f"SKIPPED names commands the README no longer has: {stale}"
    # The tour's transcripts were read as transcripts.
    assert any(c.text.startswith("wscat -c ") and c.transcript for c in README_COMMANDS)
    assert sum(1 for c in README_COMMANDS if c.text.startswith("herald connect ") and c.transcript) >= 2


def test_every_readme_command_runs_on_the_defaults(default_server: ServerProcess) -> None:
    runner = Runner(default_server)
    started = time.monotonic()
    ran = 0
    for command in README_COMMANDS:
        if skip_reason(command) is None:
            runner.run(command)
            ran += 1
    assert ran >= 10
    print(f"{ran} README commands in {time.monotonic() - started:.1f} s")


def test_every_channel_the_readme_names_exists_on_the_defaults(default_server: ServerProcess) -> None:
    found = set(CHANNEL.findall(README.read_text()))
    channels = {c for c in found if not c.split(":", 1)[1].isdigit()} - NOT_CHANNELS
    assert {"chat:lobby", "dashboard:metrics", "chat:dm#alice,bob"} <= channels, channels
    for channel in sorted(channels):
        query = urllib.parse.urlencode({"channel": channel})
        status, body = http_get(f"{default_server.http}/api/history?{query}")
        # 200, or 409 for a namespace without history (dashboard): never 404, unknown namespace.
        assert status in (200, 409), f"{channel}: HTTP {status} {body!r}"


@pytest.mark.parametrize("page", sorted(DOC_PAGES))
def test_the_docs_pages_commands_run(page: str) -> None:
    found = commands((ROOT / page).read_text(), page)
    assert found, f"{page} has no shell command"
    server = ServerProcess()
    server.env = {k: v for k, v in server.env.items() if not k.startswith("HERALD_")}
    server.env.update(HERALD_LOG_LEVEL="warning", **DOC_PAGES[page])
    server.start()
    try:
        runner = Runner(server, exact=False)
        for command in found:
            assert skip_reason(command) is None, command
            runner.run(command)
    finally:
        server.stop()
