"""The studio's access rules, as a pure ASGI middleware (no framework needed to read them):

- a non-local bind needs the token (stored 0600 in the data folder; compared in constant time), from the
  `Authorization: Bearer` header, the studio's cookie, or once as `?token=` on the page's address (then a cookie);
- the Host header must be the studio's own when it listens on 127.0.0.1 (a DNS-rebinding page cannot reach it);
- every state-changing request (not GET/HEAD) must be JSON with the `X-Studio-Request` header and, when the browser
  says where it comes from (Origin, Sec-Fetch-Site), same-origin: a cross-site page can send neither without a
  CORS preflight, which the studio never answers.
"""

import hmac
import json
import os
import secrets
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from lora_diffusion.formats.io import atomic_write

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
TOKEN_COOKIE = "studio_token"
REQUEST_HEADER = "x-studio-request"
SAFE_METHODS = ("GET", "HEAD")


def is_local(host: str) -> bool:
    return host in LOCAL_HOSTS


def load_or_create_token(data_dir: Path) -> tuple[str, bool]:
    """(the token, whether it was created now). Created once, kept 0600 in the data folder."""
    path = Path(data_dir) / "token"
    if path.is_file():
        return path.read_text(encoding="utf-8").strip(), False
    token = secrets.token_urlsafe(32)

    def write(f):
        os.fchmod(f.fileno(), 0o600)  # never readable by others, not even as the temp file
        f.write(token + "\n")

    atomic_write(path, write, mode="w")
    return token, True


class Guard:
    """The ASGI app wrapped by the checks above."""

    def __init__(self, app, *, host: str, port: int, token: str | None):
        self.app, self.token = app, token if not is_local(host) else None
        names = LOCAL_HOSTS if is_local(host) else None
        self.hosts = None if names is None else {f"{n}:{port}" for n in names} | {f"[::1]:{port}"}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self.refusal(scope, headers)
        if refusal == "set-cookie":
            return await redirect_with_cookie(send, scope["path"], self.token)
        if refusal:
            return await reply(send, 403 if refusal.startswith("forbidden") else 401, {"error": refusal})
        return await self.app(scope, receive, send)

    def refusal(self, scope, headers) -> str | None:
        host = headers.get("host", "")
        if self.hosts is not None and host not in self.hosts:
            return f"forbidden: Host {host!r} is not this studio's address (it listens on 127.0.0.1)"
        if self.token is not None:
            given = bearer(headers) or cookie(headers, TOKEN_COOKIE)
            if given is None:
                query = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [None])[0]
                if query is not None and scope["method"] in SAFE_METHODS and same_token(query, self.token):
                    return "set-cookie"
                return "a token is required: open the address the studio printed (with ?token=) or send " \
                       "'Authorization: Bearer <token>' (the token is in the data folder's 'token' file)"
            if not same_token(given, self.token):
                return "wrong token"
        if scope["method"] not in SAFE_METHODS:
            return cross_site(headers, host)
        return None


def cross_site(headers, host) -> str | None:
    """Why a state-changing request is refused as possibly cross-site, or None."""
    if headers.get(REQUEST_HEADER) != "1":
        return "forbidden: a state-changing request needs the X-Studio-Request: 1 header (the studio's page sends it)"
    if not headers.get("content-type", "").startswith("application/json"):
        return "forbidden: a state-changing request must be application/json"
    if headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        return "forbidden: a cross-site request"
    origin = headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != host:
        return f"forbidden: Origin {origin!r} is not this studio"
    return None


def same_token(given: str, token: str) -> bool:
    return hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8"))


def bearer(headers) -> str | None:
    value = headers.get("authorization", "")
    return value[7:].strip() if value.lower().startswith("bearer ") else None


def cookie(headers, name) -> str | None:
    for part in headers.get("cookie", "").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


async def reply(send, status: int, body: dict):
    data = json.dumps(body).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


async def redirect_with_cookie(send, path: str, token: str):
    """The token from the address, moved into an HttpOnly SameSite=Strict cookie (and out of the address bar)."""
    set_cookie = f"{TOKEN_COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"
    await send({"type": "http.response.start", "status": 303,
                "headers": [(b"location", path.encode("latin-1")), (b"set-cookie", set_cookie.encode("latin-1")),
                            (b"content-length", b"0")]})
    await send({"type": "http.response.body", "body": b""})
