"""The Fleet gateway: the only part of a SuperLink that SuperNodes on other machines reach.

In Flower 1.42 the SuperLink serves its Fleet API (SuperNodes), Control API (``flwr run``,
``flwr supernode register``, ``flwr ls``) and ServerApp Runtime API on one HTTPS port, and
the open-source build authenticates none of the Control calls: whoever reaches that port
with the public ``ca.crt`` can register a node key of their own, submit a run (code that
every node then executes) or claim a ServerApp task. ``fedrec deploy superlink`` therefore
binds the SuperLink to loopback and puts this gateway on the public address. It serves
TLS with the SuperLink's certificate and forwards exactly the Fleet calls a SuperNode
makes (``FLEET_PATHS``, POST) and the health check; anything else gets 403 and is logged.
The operator reaches the Control API on the server itself (or through an SSH tunnel).

Node authentication is untouched: each Fleet request carries the node's signature, which
the SuperLink checks behind the gateway (``--enable-supernode-auth``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger("fedrec.gateway")

# The calls Flower 1.42's SuperNode makes (flwr/supernode/fleet_http_client.py).
FLEET_PATHS = frozenset(f"/v1/fleet/{name}" for name in (
    "register-node", "activate-node", "deactivate-node", "unregister-node",
    "send-node-heartbeat", "pull-messages", "push-messages", "get-run", "get-fab",
    "push-object", "pull-object", "confirm-message-received"))
HEALTH_PATH = "/health"
# hop-by-hop headers (RFC 9110 7.6.1), those the forwarding client sets itself, and
# client-address headers a stranger could forge (the SuperLink trusts them from loopback)
_DROP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                   "te", "trailer", "transfer-encoding", "upgrade", "host", "content-length",
                   "forwarded", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
                   "x-forwarded-port", "x-real-ip"})
UPSTREAM_TIMEOUT = 600.0  # seconds; large pushes/pulls of model objects on slow links
MAX_BODY = 256 * 2**20  # bytes a request body may have (model objects are far smaller)
BODY_TIMEOUT = 120.0  # seconds to receive a whole request body
MAX_CONNECTIONS = 512  # concurrent connections; more get 503

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def allowed(method: str, path: str) -> bool:
    """Whether a request may pass the gateway: a SuperNode's Fleet call or a health check."""
    if path == HEALTH_PATH:
        return method in ("GET", "HEAD")
    return method == "POST" and path in FLEET_PATHS


class FleetGateway:
    """An ASGI app forwarding the allowed requests to ``upstream`` over TLS.

    Args:
        upstream: the SuperLink's loopback address, e.g. ``127.0.0.1:8000``.
        ca_file: the CA that signed the SuperLink's certificate (verified upstream).
    """

    def __init__(self, upstream: str, ca_file: Path, max_body: int = MAX_BODY) -> None:
        self.base = f"https://{upstream}"
        self.max_body = max_body
        self.ssl = ssl.create_default_context(cafile=str(ca_file))
        self.client: httpx.AsyncClient | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":  # websockets and the like: nothing of the Fleet API
            return
        method, path = scope["method"], scope["path"]
        peer = scope.get("client") or ("?", 0)
        if not allowed(method, path):
            log.warning("refused %s %r from %s: the gateway forwards only the Fleet API",
                        method[:16], path[:200], peer[0])
            await _respond(send, 403, b'{"detail": "fedrec gateway: only the Fleet API is '
                                      b'served here; the Control API is on the server"}')
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_body:
            await _respond(send, 413, b'{"detail": "fedrec gateway: body too large"}')
            return
        try:
            body = await asyncio.wait_for(self._read_body(receive), BODY_TIMEOUT)
        except TimeoutError:
            await _respond(send, 408, b'{"detail": "fedrec gateway: body too slow"}')
            return
        if body is None:
            await _respond(send, 413, b'{"detail": "fedrec gateway: body too large"}')
            return
        headers = [(k, v) for k, v in scope["headers"]
                   if k.decode("latin-1").lower() not in _DROP]
        headers.append((b"x-forwarded-for", str(peer[0]).encode("latin-1")))
        query = scope.get("query_string", b"").decode("latin-1")
        url = self.base + path + (f"?{query}" if query else "")
        assert self.client is not None
        try:
            request = self.client.build_request(method, url, headers=headers, content=body)
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as err:
            log.error("SuperLink unreachable at %s: %s", self.base, err)
            await _respond(send, 502, b'{"detail": "fedrec gateway: SuperLink unreachable"}')
            return
        try:
            out = [(k.encode("latin-1"), v.encode("latin-1"))
                   for k, v in response.headers.multi_items() if k.lower() not in _DROP]
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": out})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The request body, or None past ``max_body`` bytes (read no further)."""
        body = bytearray()
        more = True
        while more:
            event = await receive()
            body += event.get("body", b"")
            if len(body) > self.max_body:
                return None
            more = event.get("more_body", False)
        return bytes(body)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                self.client = httpx.AsyncClient(verify=self.ssl, timeout=UPSTREAM_TIMEOUT)
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                if self.client is not None:
                    await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def build_server(upstream: str, certs: Path, host: str, port: int) -> Any:
    """A uvicorn server for the gateway: TLS with ``certs``' server certificate."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = uvicorn.Config(FleetGateway(upstream, certs / "ca.crt"), host=host, port=port,
                            ssl_certfile=str(certs / "server.pem"),
                            ssl_keyfile=str(certs / "server.key"), log_level="warning",
                            lifespan="on", limit_concurrency=MAX_CONNECTIONS,
                            proxy_headers=False, server_header=False)
    return uvicorn.Server(config)


def serve(upstream: str, certs: Path, host: str, port: int) -> None:
    """Run the gateway until interrupted (Ctrl-C / SIGTERM)."""
    build_server(upstream, certs, host, port).run()
