"""herald.d.ts, the types of herald.js's own API: strict tsc on a typed app, and no drift.

`scripts/test` installs Node.js (Debian's `nodejs npm` when missing) and TypeScript into
tests/typescript/node_modules (`npm ci`, pinned by package-lock.json).  Without them these
tests skip and say how to install; under CI (`CI` set) they fail instead, so that CI can
never pass without checking the types.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

HERE = Path(__file__).parent
STATIC = HERE.parent.parent / "src" / "herald" / "static"
TSC = HERE / "node_modules" / ".bin" / "tsc"
CHECK_API = HERE / "check_api.mjs"


def _node() -> str:
    node = shutil.which("node")
    missing = []
    if node is None:
        missing.append("Node.js (apt-get install nodejs npm)")
    if not TSC.exists():
        missing.append("TypeScript (npm ci --prefix tests/typescript)")
    if missing:
        message = f"needs {' and '.join(missing)}; scripts/test installs them"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    assert node is not None
    return node


def run(*command: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, timeout=120, cwd=HERE
    )


def test_typed_usage_compiles_with_strict_tsc() -> None:
    """usage.ts uses every part of the API; its `@ts-expect-error` lines prove misuse is refused."""
    node = _node()
    result = run(node, TSC, "-p", HERE / "tsconfig.json")
    assert result.returncode == 0, result.stdout + result.stderr


def test_tsc_refuses_a_call_the_declarations_do_not_allow(tmp_path: Path) -> None:
    node = _node()
    app = tmp_path / "app.ts"
    app.write_text(
        f'import {{ HeraldClient }} from "{STATIC.as_posix()}/herald.js";\n'
        'const client = new HeraldClient({ name: "ada" });\n'
        'client.on("publication", (pub) => pub.offset.toUpperCase());\n'
    )
    config = tmp_path / "tsconfig.json"
    config.write_text(json.dumps({"extends": str(HERE / "tsconfig.json"), "files": ["app.ts"]}))
    result = run(node, TSC, "-p", config)
    assert result.returncode != 0
    assert "toUpperCase" in result.stdout and "number" in result.stdout, result.stdout


def test_herald_js_and_its_declarations_name_the_same_api() -> None:
    node = _node()
    result = run(node, CHECK_API)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "declares all 7 exports" in result.stdout


def test_drift_between_herald_js_and_herald_d_ts_is_reported(tmp_path: Path) -> None:
    """A method added to herald.js, one dropped from herald.d.ts, an event renamed: each named, exit 1."""
    node = _node()
    for name in ("herald.js", "herald.d.ts", "herald-protocol.d.ts"):
        shutil.copy(STATIC / name, tmp_path / name)
    js = tmp_path / "herald.js"
    source = js.read_text()
    anchor = "  /** Round trip to the server. */\n"
    assert anchor in source
    source = source.replace(anchor, "  drain() {}\n\n" + anchor, 1)
    assert 'this._emit("recovered", detail)' in source
    js.write_text(source.replace('this._emit("recovered", detail)', 'this._emit("restored", detail)'))
    dts = tmp_path / "herald.d.ts"
    declarations = dts.read_text()
    dropped = "  unsubscribe(channel: string): Promise<void>;\n"
    assert dropped in declarations
    dts.write_text(declarations.replace(dropped, "  unsubscribed: boolean;\n", 1))

    result = run(node, CHECK_API, js, dts)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "HeraldClient.drain exists in herald.js, not in herald.d.ts" in result.stderr
    assert "HeraldClient.unsubscribe exists in herald.js, not in herald.d.ts" in result.stderr
    assert "herald.d.ts declares HeraldClient.unsubscribed, herald.js has no such member" in result.stderr
    assert 'herald.js emits "restored", HeraldEventMap does not declare it' in result.stderr
