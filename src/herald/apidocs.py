"""``/docs`` (Swagger UI) and ``/redoc`` served without internet.

FastAPI's own pages load Swagger UI, ReDoc and a favicon from public CDNs, so on a
machine without internet (or behind a strict proxy) ``/docs`` is a blank page.
:func:`add_offline_docs` serves the same pages with their assets from
``/docs/assets/``, read from the ``fastapi-offline`` package (see pyproject.toml for
why that one).  The pages load nothing from outside the server.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

#: Where the Swagger UI and ReDoc assets are served.
ASSETS_PATH = "/docs/assets"
#: The asset files the pages load (all shipped by ``fastapi-offline``).
SWAGGER_JS = "swagger-ui-bundle.js"
SWAGGER_CSS = "swagger-ui.css"
REDOC_JS = "redoc.standalone.js"
FAVICON = "favicon.png"
#: Content-Security-Policy of /redoc.
REDOC_IMAGES_POLICY = "img-src 'self' data:"


def assets_directory() -> str:
    """The folder of Swagger UI and ReDoc builds inside the installed ``fastapi-offline``."""
    return str(resources.files("fastapi_offline") / "static")


def add_offline_docs(app: FastAPI, *, docs_url: str = "/docs", redoc_url: str = "/redoc") -> None:
    """Serve Swagger UI at ``docs_url`` and ReDoc at ``redoc_url`` with local assets.

    Build ``app`` with ``docs_url=None, redoc_url=None`` (FastAPI's CDN pages off).
    """
    openapi_url = app.openapi_url
    if openapi_url is None:
        raise ValueError("the offline docs need the OpenAPI document (openapi_url is None)")
    oauth2_redirect_url = docs_url + "/oauth2-redirect"
    app.mount(ASSETS_PATH, StaticFiles(directory=assets_directory()), name="docs_assets")

    def root(request: Request) -> str:
        return str(request.scope.get("root_path", "")).rstrip("/")

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        base = root(request)
        return get_swagger_ui_html(
            openapi_url=base + openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{base}{ASSETS_PATH}/{SWAGGER_JS}",
            swagger_css_url=f"{base}{ASSETS_PATH}/{SWAGGER_CSS}",
            swagger_favicon_url=f"{base}{ASSETS_PATH}/{FAVICON}",
            oauth2_redirect_url=base + oauth2_redirect_url,
            init_oauth=app.swagger_ui_init_oauth,
            swagger_ui_parameters=app.swagger_ui_parameters,
        )

    @app.get(oauth2_redirect_url, include_in_schema=False)
    async def swagger_ui_oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(redoc_url, include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        base = root(request)
        page = get_redoc_html(
            openapi_url=base + openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{base}{ASSETS_PATH}/{REDOC_JS}",
            redoc_favicon_url=f"{base}{ASSETS_PATH}/{FAVICON}",
            # Google Fonts is a CDN too; ReDoc falls back to the system fonts.
            with_google_fonts=False,
        )
        # ReDoc's bundle always draws its vendor's logo from the vendor's CDN (hidden when
        # it fails to load): images from elsewhere are not even requested.
        page.headers["Content-Security-Policy"] = REDOC_IMAGES_POLICY
        return page


__all__ = ["ASSETS_PATH", "add_offline_docs", "assets_directory"]
