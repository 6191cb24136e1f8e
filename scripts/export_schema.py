#!/usr/bin/env python3
"""Export the protocol's JSON Schema and TypeScript declarations from the pydantic models.

Writes

* ``docs/schema/protocol.schema.json`` -- JSON Schema (draft 2020-12) of every frame, and
* ``src/herald/static/herald-protocol.d.ts`` -- the same types for the JS client.

Usage::

    .venv/bin/python scripts/export_schema.py          # (re)write both files
    .venv/bin/python scripts/export_schema.py --check  # exit 1 if either file is stale

CI runs ``--check`` (through tests/test_schema.py), so a change to the wire protocol
always shows up in review as a diff of these two files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = ROOT / "docs" / "schema" / "protocol.schema.json"
DTS_PATH = ROOT / "src" / "herald" / "static" / "herald-protocol.d.ts"

sys.path.insert(0, str(ROOT / "src"))

from herald.asyncapi import protocol_json_schema, typescript_definitions  # noqa: E402


def render() -> dict[Path, str]:
    """The exported files and their expected text."""
    schema = protocol_json_schema()
    return {
        SCHEMA_PATH: json.dumps(schema, indent=2, ensure_ascii=False) + "\n",
        DTS_PATH: typescript_definitions(schema),
    }


def stale_files() -> list[Path]:
    """The exported files whose checked-in text differs from what the models give."""
    stale = []
    for path, text in render().items():
        try:
            current = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            current = None
        if current != text:
            stale.append(path)
    return stale


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="do not write; exit 1 when a file is out of date"
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for path in stale:
            print(
                f"{_shown(path)} is out of date with herald.protocol.messages: run scripts/export_schema.py",
                file=sys.stderr,
            )
        return 1 if stale else 0
    for path, text in render().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {_shown(path)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
