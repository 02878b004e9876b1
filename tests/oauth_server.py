"""A small OpenID Connect provider on loopback, standing in for huggingface.co's OAuth in the Space's browser tests.

A Space with `hf_oauth: true` gets `OAUTH_CLIENT_ID`, `OAUTH_CLIENT_SECRET`, `OAUTH_SCOPES` and
`OPENID_PROVIDER_URL` from the Hub, and Gradio's "Sign in with Hugging Face" runs the authorization-code flow
against that provider with authlib. This server implements what that flow uses: the discovery document, an
authorization endpoint that signs the one configured user in at once (no consent page), the token endpoint (the
access token is that user's Hub token; the ID token is an HS256 JWT carrying the nonce), and the key set.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlencode, urlsplit

from joserfc import jwt
from joserfc.jwk import OctKey


@dataclass
class User:
    username: str
    token: str  # the Hub token the access token stands for


@dataclass
class ProviderState:
    user: User
    client_id: str
    client_secret: str
    key: OctKey
    url: str = ""
    codes: dict[str, dict] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    tokens_issued: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: ProviderState

    def log_message(self, format, *args):
        pass

    def send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        split = urlsplit(self.path)
        query = {key: values[0] for key, values in parse_qs(split.query).items()}
        self.state.requests.append(("GET", split.path))
        if split.path == "/.well-known/openid-configuration":
            base = self.state.url
            return self.send_json(200, {
                "issuer": base,
                "authorization_endpoint": f"{base}/oauth/authorize",
                "token_endpoint": f"{base}/oauth/token",
                "userinfo_endpoint": f"{base}/oauth/userinfo",
                "jwks_uri": f"{base}/oauth/jwks",
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["HS256"],
                "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
            })
        if split.path == "/oauth/jwks":
            return self.send_json(200, {"keys": [self.state.key.as_dict(private=True)]})
        if split.path == "/oauth/authorize":
            if query.get("client_id") != self.state.client_id or query.get("response_type") != "code":
                return self.send_json(400, {"error": "invalid_request"})
            code = secrets.token_urlsafe(16)
            with self.state.lock:
                self.state.codes[code] = {"nonce": query.get("nonce"), "scope": query.get("scope", "")}
            target = query["redirect_uri"] + ("&" if "?" in query["redirect_uri"] else "?")
            target += urlencode({"code": code, "state": query.get("state", "")})
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        return self.send_json(404, {"error": f"no route for GET {split.path}"})

    def do_POST(self):
        split = urlsplit(self.path)
        self.state.requests.append(("POST", split.path))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode()
        form = {key: values[0] for key, values in parse_qs(body).items()}
        if split.path != "/oauth/token":
            return self.send_json(404, {"error": f"no route for POST {split.path}"})
        client_id, client_secret = form.get("client_id"), form.get("client_secret")
        header = self.headers.get("Authorization", "")
        if header.startswith("Basic "):
            client_id, _, client_secret = base64.b64decode(header[6:]).decode().partition(":")
        if (client_id, client_secret) != (self.state.client_id, self.state.client_secret):
            return self.send_json(401, {"error": "invalid_client"})
        with self.state.lock:
            grant = self.state.codes.pop(form.get("code", ""), None)
        if grant is None or form.get("grant_type") != "authorization_code":
            return self.send_json(400, {"error": "invalid_grant"})
        user, now = self.state.user, int(time.time())
        claims = {
            "iss": self.state.url,
            "sub": f"id-{user.username}",
            "aud": self.state.client_id,
            "iat": now,
            "exp": now + 3600,
            "nonce": grant["nonce"],
            "name": user.username.title(),
            "preferred_username": user.username,
            "profile": f"https://huggingface.co/{user.username}",
            "picture": "",
        }
        id_token = jwt.encode({"alg": "HS256", "kid": self.state.key.kid}, claims, self.state.key)
        self.state.tokens_issued.append(user.token)
        return self.send_json(200, {
            "access_token": user.token,
            "token_type": "bearer",
            "expires_in": 3600,
            "scope": grant["scope"],
            "id_token": id_token,
        })


@dataclass
class OAuthProvider:
    state: ProviderState
    server: ThreadingHTTPServer
    thread: threading.Thread

    @property
    def url(self) -> str:
        return self.state.url

    def space_environment(self) -> dict[str, str]:
        """The variables the Hub sets in a Space with `hf_oauth: true`."""
        return {
            "OAUTH_CLIENT_ID": self.state.client_id,
            "OAUTH_CLIENT_SECRET": self.state.client_secret,
            "OAUTH_SCOPES": "openid profile contribute-repos",
            "OPENID_PROVIDER_URL": self.state.url,
        }

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve(user: User) -> OAuthProvider:
    """Starts the provider on a free loopback port in a daemon thread; `user` is who signs in."""
    key = OctKey.import_key(secrets.token_bytes(32), {"kid": "loopback", "alg": "HS256"})
    state = ProviderState(user=user, client_id="space-client", client_secret=secrets.token_hex(16), key=key)
    handler = type("BoundHandler", (Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="loopback-oauth", daemon=True)
    thread.start()
    return OAuthProvider(state, server, thread)
