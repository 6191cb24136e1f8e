"""Layers: the client depends on the protocol only, never on the server.

Run in a fresh interpreter, because the test process has the server loaded already.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

#: Modules of herald the client may load: the package itself, the client, the protocol,
#: and the pure codes and exceptions the protocol uses.
CLIENT_SIDE = ("herald", "herald.client", "herald.codes", "herald.exceptions", "herald.protocol")

#: Server-side packages the client must never pull in.
SERVER_THIRD_PARTY = ("fastapi", "starlette", "jwt", "pydantic_settings", "uvicorn", "redis", "nats")


def _modules_after(statement: str) -> list[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    modules: list[str] = json.loads(result.stdout)
    return modules


def _is_client_side(module: str) -> bool:
    return any(module == allowed or module.startswith(allowed + ".") for allowed in CLIENT_SIDE)


@pytest.mark.parametrize(
    "statement", ["import herald.client", "from herald.client import Client", "import herald"]
)
def test_client_loads_no_server_module(statement: str) -> None:
    modules = _modules_after(statement)
    assert "herald.client" in modules or statement == "import herald"
    server = [m for m in modules if m.startswith("herald") and not _is_client_side(m)]
    assert server == [], f"{statement!r} loads server modules: {server}"
    third_party = [m for m in modules if m.split(".")[0] in SERVER_THIRD_PARTY]
    assert third_party == [], f"{statement!r} loads server dependencies: {third_party}"


def test_server_names_still_resolve_lazily() -> None:
    modules = _modules_after("import herald\nherald.Settings\nherald.Herald")
    assert "herald.config" in modules
    assert "herald.app" in modules
