"""The public API: everything in herald.__all__ exists, and the client stays light."""

from __future__ import annotations

import subprocess
import sys

import herald


def test_all_names_resolve() -> None:
    for name in herald.__all__:
        assert getattr(herald, name) is not None, name
    assert herald.Herald.__name__ == "Herald"


def test_client_import_does_not_load_fastapi() -> None:
    code = "import sys, herald.client; print('fastapi' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
