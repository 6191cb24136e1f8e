"""The files Herald serves under ``/static``: the browser client, the admin page's script,
the demo pages.

:class:`HeraldStaticFiles` serves the package's ``static`` folder, or only the files
named in ``only``: with the demos off, ``herald serve`` keeps the JS client
(:data:`CLIENT_FILES`, so that applications can load it) and the admin page's assets
(:data:`ADMIN_FILES`, when the admin page is on), and every demo page answers 404.
An application mounts the client files with :meth:`herald.Herald.static_files`.

TypeScript declarations (``.ts``, ``.d.ts``) are served as ``application/typescript``:
the system MIME table maps ``.ts`` to Qt Linguist files (``text/vnd.trolltech.linguist``)
or MPEG transport streams, neither of which a browser or a tool expects here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from importlib import resources

from starlette.exceptions import HTTPException
from starlette.responses import FileResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

#: The browser client: what an application needs to talk to Herald from a page.
CLIENT_FILES = frozenset({"herald.js", "herald.d.ts", "herald-protocol.d.ts"})
#: What the admin page (``/admin``) loads from ``/static``.
ADMIN_FILES = frozenset({"admin.js", "favicon.svg"})
#: Content type of TypeScript sources and declarations.
TYPESCRIPT_TYPE = "application/typescript; charset=utf-8"


def static_directory() -> str:
    """The package's ``static`` folder (an installed wheel or a source checkout alike)."""
    return str(resources.files("herald") / "static")


class HeraldStaticFiles(StaticFiles):
    """``StaticFiles`` over Herald's ``static`` folder.

    ``only``: the file names served (any other path answers 404, as if it did not
    exist); ``None`` serves the whole folder.
    """

    def __init__(self, only: Iterable[str] | None = None) -> None:
        super().__init__(directory=static_directory())
        self.only = frozenset(only) if only is not None else None

    async def get_response(self, path: str, scope: Scope) -> Response:
        if self.only is not None and path not in self.only:
            raise HTTPException(status_code=404)
        return await super().get_response(path, scope)

    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        if isinstance(response, FileResponse) and str(full_path).endswith(".ts"):
            response.media_type = TYPESCRIPT_TYPE
            response.headers["content-type"] = TYPESCRIPT_TYPE
        return response


__all__ = ["ADMIN_FILES", "CLIENT_FILES", "TYPESCRIPT_TYPE", "HeraldStaticFiles", "static_directory"]
