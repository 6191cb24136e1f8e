"""A self-contained HTML page for the AsyncAPI document (``/asyncapi``): no CDN, all text escaped."""

from __future__ import annotations

import copy
import html
import json
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass

from .frames import JSON
from .typescript import ref_tail, ts_type

_CSS = """
body{font:15px/1.5 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d232a;background:#f7f8fa}
header{background:#1d2b3a;color:#fff;padding:1.2rem 2rem}header h1{margin:0 0 .3rem}
header p{max-width:70rem;margin:.3rem 0;color:#d8e1ea}main{display:flex;gap:2rem;padding:1rem 2rem}
nav{flex:0 0 15rem;position:sticky;top:1rem;align-self:flex-start;max-height:95vh;overflow:auto;font-size:13px}
nav a{display:block;color:#28557a;text-decoration:none;padding:1px 0}nav h3{margin:.8rem 0 .2rem}
section{flex:1;min-width:0}h2{border-bottom:2px solid #d5dbe1;padding-bottom:.2rem;margin-top:2rem}
.card{background:#fff;border:1px solid #dde3e9;border-radius:6px;padding:.6rem 1rem;margin:.8rem 0}
.card h3,.card h4{margin:.2rem 0}code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:13px}
code{background:#eef2f6;padding:0 3px;border-radius:3px}pre{background:#f1f4f7;padding:.6rem;overflow:auto;border-radius:4px}
table{border-collapse:collapse;width:100%;margin:.4rem 0}td,th{border:1px solid #e0e5ea;padding:3px 6px;text-align:left;vertical-align:top;font-size:13.5px}
th{background:#f0f3f6}.tag{display:inline-block;font-size:12px;font-weight:600;border-radius:3px;padding:0 6px;margin-right:6px;color:#fff}
header code{background:#34495e;color:#fff}.receive{background:#2f7d32}.send{background:#1e63a8}.muted{color:#66727e}details summary{cursor:pointer;color:#28557a}
"""


def _inline(text: str) -> str:
    """Escape text and turn `code` spans into <code>: descriptions are Markdown-ish."""
    escaped = html.escape(text)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


def _anchor(kind: str, name: str) -> str:
    return f"{kind}-" + re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


def _html_type(schema: Any) -> str:
    def link(ref: str) -> str:
        name = ref_tail(ref)
        return f"@@{name}@@"

    text = ts_type(schema, link)
    escaped = html.escape(text)
    return re.sub(
        r"@@([A-Za-z0-9_.\-]+)@@",
        lambda match: f'<a href="#{_anchor("schema", match.group(1))}">{match.group(1)}</a>',
        escaped,
    )


_CONSTRAINTS = (
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "pattern",
    "default",
)


def _schema_table(schema: Any) -> str:
    if not isinstance(schema, dict) or not schema.get("properties"):
        return f"<p>Type: <code>{_html_type(schema)}</code></p>"
    required = set(schema.get("required", []))
    rows = []
    for name, prop in schema["properties"].items():
        prop = prop if isinstance(prop, dict) else {}
        notes = [f"{key}: {json.dumps(prop[key])}" for key in _CONSTRAINTS if key in prop]
        for option in prop.get("anyOf", []):
            if isinstance(option, dict):
                notes += [f"{key}: {json.dumps(option[key])}" for key in _CONSTRAINTS if key in option]
        text = _inline(prop.get("description", ""))
        if notes:
            text += f' <span class="muted">({html.escape(", ".join(notes))})</span>'
        rows.append(
            f"<tr><td><code>{html.escape(name)}</code></td><td><code>{_html_type(prop)}</code></td>"
            f"<td>{'yes' if name in required else ''}</td><td>{text}</td></tr>"
        )
    one_of = [o.get("required", []) for o in schema.get("oneOf", []) if isinstance(o, dict)]
    note = ""
    if one_of and all(len(names) == 1 for names in one_of):
        fields = ", ".join(f"<code>{html.escape(names[0])}</code>" for names in one_of)
        note = f"<p>Exactly one of {fields} (not null).</p>"
    return (
        "<table><tr><th>field</th><th>type</th><th>required</th><th>description</th></tr>"
        + "".join(rows)
        + "</table>"
        + note
    )


def _pretty(value: Any) -> str:
    return html.escape(json.dumps(value, indent=2, ensure_ascii=False))


def _resolve(doc: JSON, ref: str) -> Any:
    node: Any = doc
    for part in ref.lstrip("#/").split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def render_html(doc: JSON) -> str:
    """A self-contained HTML page for an AsyncAPI document (no scripts, no external assets).

    Every string from the document is HTML-escaped, so application descriptions and
    schema text cannot inject markup.
    """
    doc = copy.deepcopy(doc)
    info = doc.get("info", {})
    components = doc.get("components", {})
    schemas: JSON = components.get("schemas", {})
    messages: JSON = components.get("messages", {})
    title = html.escape(f"{info.get('title', 'AsyncAPI')} {info.get('version', '')}".strip())
    parts: list[str] = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        '<meta name="viewport" content="width=device-width,initial-scale=1">',
        f"<title>{title}: AsyncAPI</title><style>{_CSS}</style></head><body>",
        f"<header><h1>{title}</h1><p>{_inline(info.get('description', ''))}</p>",
        f"<p>AsyncAPI {html.escape(str(doc.get('asyncapi', '')))} &middot; "
        '<a style="color:#9cd0ff" href="asyncapi.json">asyncapi.json</a></p></header><main>',
    ]
    # navigation
    nav = ["<nav><h3>Contents</h3>", '<a href="#servers">Servers</a>']
    nav.append("<h3>Channels</h3>")
    nav += [
        f'<a href="#{_anchor("channel", key)}">{html.escape(str(ch.get("address", key)))}</a>'
        for key, ch in doc.get("channels", {}).items()
    ]
    nav.append("<h3>Operations</h3>")
    nav += [
        f'<a href="#{_anchor("operation", key)}">{html.escape(key)}</a>' for key in doc.get("operations", {})
    ]
    nav.append('<h3>Reference</h3><a href="#error-codes">Error codes</a>')
    nav.append('<a href="#close-codes">Close codes</a><a href="#messages">Messages</a>')
    nav.append('<a href="#schemas">Schemas</a></nav>')
    parts += nav
    parts.append("<section>")

    parts.append('<h2 id="servers">Servers</h2>')
    for key, server in doc.get("servers", {}).items():
        parts.append(
            f'<div class="card"><h3>{html.escape(key)}</h3><p><code>'
            f"{html.escape(str(server.get('protocol', '')))}://{html.escape(str(server.get('host', '')))}"
            f"</code></p><p>{_inline(server.get('description', ''))}</p></div>"
        )

    parts.append('<h2 id="channels">Channels</h2>')
    for key, channel in doc.get("channels", {}).items():
        refs = [ref.get("$ref", "") for ref in channel.get("messages", {}).values()]
        links = ", ".join(
            f'<a href="#{_anchor("message", ref_tail(ref))}">{html.escape(ref_tail(ref))}</a>' for ref in refs
        )
        extra = channel.get("x-herald-namespace")
        parts.append(
            f'<div class="card" id="{_anchor("channel", key)}"><h3><code>'
            f"{html.escape(str(channel.get('address', '')))}</code> "
            f"{html.escape(channel.get('title', ''))}</h3>"
            f"<p>{_inline(channel.get('description', ''))}</p><p>Messages: {links}</p>"
        )
        if extra is not None:
            parts.append(
                f"<details><summary>namespace options</summary><pre>{_pretty(extra)}</pre></details>"
            )
        if "bindings" in channel:
            parts.append(
                f"<details><summary>bindings</summary><pre>{_pretty(channel['bindings'])}</pre></details>"
            )
        parts.append("</div>")

    parts.append('<h2 id="operations">Operations</h2>')
    for key, operation in doc.get("operations", {}).items():
        action = "receive" if operation.get("action") == "receive" else "send"
        who = "client &rarr; server" if action == "receive" else "server &rarr; client"
        channel_ref = operation.get("channel", {}).get("$ref", "")
        msgs = [ref.get("$ref", "") for ref in operation.get("messages", [])]
        replies = [ref.get("$ref", "") for ref in operation.get("reply", {}).get("messages", [])]

        def message_links(refs: list[str]) -> str:
            return ", ".join(
                f'<a href="#{_anchor("message", ref_tail(r))}">{html.escape(ref_tail(r))}</a>' for r in refs
            )

        parts.append(
            f'<div class="card" id="{_anchor("operation", key)}"><h3>'
            f'<span class="tag {action}">{action}</span>{html.escape(key)}</h3>'
            f'<p class="muted">{who} on <a href="#{_anchor("channel", ref_tail(channel_ref))}">'
            f"{html.escape(ref_tail(channel_ref))}</a></p>"
            f"<p><b>{_inline(operation.get('summary', ''))}</b></p>"
            f"<p>{_inline(operation.get('description', ''))}</p>"
            f"<p>Message: {message_links(msgs)}</p>"
            + (f"<p>Reply: {message_links(replies)}</p>" if replies else "")
            + "</div>"
        )

    parts.append('<h2 id="error-codes">Error codes</h2>')
    parts.append(
        "<p>Carried in <code>error: {code, message}</code> of a reply; the connection stays open.</p>"
        "<table><tr><th>code</th><th>name</th><th>meaning</th></tr>"
    )
    for row in doc.get("x-herald-error-codes", []):
        parts.append(
            f"<tr><td>{int(row['code'])}</td><td><code>{html.escape(str(row['name']))}</code></td>"
            f"<td>{_inline(str(row['meaning']))}</td></tr>"
        )
    parts.append("</table>")
    parts.append('<h2 id="close-codes">Close codes</h2>')
    parts.append(
        "<p>WebSocket close codes. A <code>disconnect</code> push with the same code comes first "
        "on <code>/connect</code>.</p>"
        "<table><tr><th>code</th><th>name</th><th>reconnect</th><th>meaning</th></tr>"
    )
    for row in doc.get("x-herald-close-codes", []):
        parts.append(
            f"<tr><td>{int(row['code'])}</td><td><code>{html.escape(str(row['name']))}</code></td>"
            f"<td>{'yes' if row['reconnect'] else 'no'}</td><td>{_inline(str(row['meaning']))}</td></tr>"
        )
    parts.append("</table>")

    parts.append('<h2 id="messages">Messages</h2>')
    for name, message in messages.items():
        payload = message.get("payload", {})
        shown = _resolve(doc, payload["$ref"]) if isinstance(payload, dict) and "$ref" in payload else payload
        heading = html.escape(message.get("title", name))
        parts.append(
            f'<div class="card" id="{_anchor("message", name)}"><h3>{heading} '
            f'<span class="muted">{html.escape(name)}</span></h3>'
            f"<p><b>{_inline(message.get('summary', ''))}</b></p>"
            f"<p>{_inline(message.get('description', ''))}</p>"
        )
        if isinstance(payload, dict) and "$ref" in payload:
            parts.append(f"<p>Payload: <code>{_html_type(payload)}</code></p>")
        parts.append(_schema_table(shown))
        for example in message.get("examples", []):
            parts.append(
                f"<details><summary>example</summary><pre>{_pretty(example.get('payload'))}</pre></details>"
            )
        parts.append("</div>")

    parts.append('<h2 id="schemas">Schemas</h2>')
    for name, schema in schemas.items():
        parts.append(
            f'<div class="card" id="{_anchor("schema", name)}"><h4>{html.escape(name)}</h4>'
            f"<p>{_inline(schema.get('description', '') if isinstance(schema, dict) else '')}</p>"
            f"{_schema_table(schema)}"
            f"<details><summary>JSON Schema</summary><pre>{_pretty(schema)}</pre></details></div>"
        )
    parts.append("</section></main></body></html>")
    return "\n".join(parts)
