"""HTTP(S) sources: the loader fetches a document's URL without becoming a way into its own network.

A URL comes from whoever may submit documents, and the loader runs inside the cluster: fetched
blindly, `http://127.0.0.1:6379/`, `http://169.254.169.254/` (cloud metadata), `http://2130706433/` or a
redirect to any of them would put internal answers into searchable chunks (SSRF). So, by default:

- only http and https, on their default ports (80, 443);
- the host is resolved here and every address it resolves to must be public (not loopback, private,
  link-local, multicast, reserved, unspecified; an IPv4-mapped IPv6 address counts as its IPv4 one),
  and the connection goes to the address that was checked (no second lookup to rebind);
- redirects are followed by hand, at most MAX_REDIRECTS, each one checked the same way;
- no proxies or netrc from the environment; a total deadline per fetch (a server that drips a byte a
  second holds no worker), and errors that cannot heal (refused, 4xx) are not retried;
- a URL's password never appears in a dead letter or a log line.

EMBEDPIPE_FETCH_ALLOW opts hosts and networks in (`intranet.example,10.20.0.0/16,127.0.0.1`): a match
lifts both the address and the port rule for that host.
"""

from __future__ import annotations

import base64
import ipaddress
import socket
import time
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx
from tenacity import retry, retry_if_exception_type, stop_after_attempt, stop_after_delay, wait_random_exponential

from shared.errors import ConfigError, DocumentError
from shared.metrics import count_retry
from shared.settings import redact_url

STAGE = "load"
DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_REDIRECTS = 5
FETCH_TIMEOUT_S = 30.0  # one connect, one read
FETCH_DEADLINE_S = 60.0  # the whole fetch: redirects and body included


@dataclass(frozen=True)
class FetchPolicy:
    hosts: frozenset[str] = frozenset()  # host names or literal addresses opted in
    networks: tuple[Any, ...] = ()  # ipaddress networks opted in
    deadline_s: float = FETCH_DEADLINE_S

    @classmethod
    def parse(cls, allow: str, deadline_s: float = FETCH_DEADLINE_S) -> FetchPolicy:
        """From EMBEDPIPE_FETCH_ALLOW: comma-separated host names, addresses and CIDR networks."""
        hosts, networks = set(), []
        for entry in (e.strip().lower() for e in allow.split(",")):
            if not entry:
                continue
            if "/" in entry:
                try:
                    networks.append(ipaddress.ip_network(entry, strict=False))
                except ValueError as e:
                    raise ConfigError(f"EMBEDPIPE_FETCH_ALLOW: {entry!r} is not a network: {e}") from e
            elif entry.replace(".", "").replace("-", "").replace(":", "").replace("[", "").replace("]", "").isalnum():
                hosts.add(entry.strip("[]"))
            else:
                raise ConfigError(f"EMBEDPIPE_FETCH_ALLOW: {entry!r} is not a host name, address or CIDR network")
        return cls(frozenset(hosts), tuple(networks), deadline_s)

    def allows(self, host: str, address: Any = None) -> bool:
        if host.lower() in self.hosts or (address is not None and str(address) in self.hosts):
            return True
        return address is not None and any(address in network for network in self.networks)

    def check_url(self, url: httpx.URL) -> None:
        if url.scheme not in DEFAULT_PORTS:
            raise DocumentError("unsupported_type", f"cannot fetch {redact_url(str(url))}: only http(s) URLs")
        port = url.port or DEFAULT_PORTS[url.scheme]
        if port != DEFAULT_PORTS[url.scheme] and not self.allows(url.host):
            raise DocumentError(
                "source_error",
                f"refused {redact_url(str(url))}: port {port} is not {url.scheme}'s own "
                "(a host may be allowed any port with EMBEDPIPE_FETCH_ALLOW)",
            )


def is_public(address: Any) -> bool:
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return bool(address.is_global) and not address.is_multicast


class _CheckedBackend(httpcore.NetworkBackend):
    """Resolves the host itself, refuses it unless every address is public (or allowed), and connects
    to a checked address: the TLS handshake still names the host (SNI, certificate)."""

    def __init__(self, policy: FetchPolicy) -> None:
        self.policy = policy
        self._plain = httpcore.SyncBackend()

    def connect_tcp(
        self, host: str, port: int, timeout: float | None = None, local_address: str | None = None, socket_options=None
    ) -> httpcore.NetworkStream:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as e:
            raise httpcore.ConnectError(f"cannot resolve {host}: {e}") from e
        addresses = list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos))
        for address in addresses:
            if not is_public(address) and not self.policy.allows(host, address):
                raise _Refused(
                    f"{host} resolves to {address}, which is not a public address "
                    "(allow it with EMBEDPIPE_FETCH_ALLOW if it should be fetched)"
                )
        error: Exception | None = None
        for address in addresses:
            try:
                return self._plain.connect_tcp(str(address), port, timeout, local_address, socket_options)
            except httpcore.ConnectError as e:
                error = e
        raise error or httpcore.ConnectError(f"{host} has no address")

    def connect_unix_socket(self, *args: Any, **kwargs: Any) -> httpcore.NetworkStream:
        raise _Refused("unix sockets are not fetched")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class _Refused(Exception):
    """The policy refuses an address: never retried."""


class _Transient(Exception):
    pass


def fetch(uri: str, max_doc_bytes: int, policy: FetchPolicy | None = None) -> tuple[bytes, str]:
    """The body and content type at `uri` under `policy` (the default refuses non-public addresses)."""
    policy = policy or FetchPolicy()
    shown = redact_url(uri)
    try:
        url = httpx.URL(uri)
    except httpx.InvalidURL as e:
        raise DocumentError("unsupported_type", f"cannot fetch {shown}: {e}") from None
    policy.check_url(url)
    try:
        return _get(url, max_doc_bytes, policy, time.monotonic() + policy.deadline_s)
    except _Transient as e:
        raise DocumentError("source_error", f"cannot fetch {shown}: {e}") from None
    except _Refused as e:
        raise DocumentError("source_error", f"refused {shown}: {e}") from None


@retry(
    retry=retry_if_exception_type(_Transient),
    wait=wait_random_exponential(multiplier=0.5, max=10),
    stop=stop_after_attempt(4) | stop_after_delay(FETCH_DEADLINE_S),
    before_sleep=count_retry(STAGE, "io"),
    reraise=True,
)
def _get(url: httpx.URL, max_doc_bytes: int, policy: FetchPolicy, deadline: float) -> tuple[bytes, str]:
    with httpcore.ConnectionPool(network_backend=_CheckedBackend(policy), max_connections=1) as pool:
        for _ in range(MAX_REDIRECTS + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Refused(f"took longer than {policy.deadline_s:g} s")
            timeouts = dict.fromkeys(("connect", "read", "write", "pool"), min(FETCH_TIMEOUT_S, left))
            headers = [(b"Host", url.netloc), (b"Accept-Encoding", b"identity"), (b"User-Agent", b"embedpipe")]
            if url.username or url.password:  # credentials in the URL: sent as basic auth, never shown
                token = base64.b64encode(f"{url.username}:{url.password}".encode())
                headers.append((b"Authorization", b"Basic " + token))
            target = url.copy_with(username=None, password=None)
            try:
                with pool.stream("GET", str(target), headers=headers, extensions={"timeout": timeouts}) as response:
                    status = response.status
                    head = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in response.headers}
                    if status in (301, 302, 303, 307, 308) and "location" in head:
                        url = url.join(head["location"])
                        policy.check_url(url)
                        continue
                    if status >= 500 or status == 429:
                        raise _Transient(f"HTTP {status}")
                    if status >= 400:
                        raise _Refused(f"HTTP {status}")
                    body = bytearray()
                    for piece in response.iter_stream():
                        body += piece
                        if len(body) > max_doc_bytes:
                            raise DocumentError("too_large", f"the response is over {max_doc_bytes} bytes")
                        if time.monotonic() > deadline:
                            raise _Refused(f"took longer than {policy.deadline_s:g} s (a slow server)")
                    return bytes(body), head.get("content-type", "")
            except (httpcore.ConnectError, httpcore.TimeoutException, httpcore.NetworkError) as e:
                if time.monotonic() > deadline:
                    raise _Refused(f"took longer than {policy.deadline_s:g} s") from None
                raise _Transient(f"{type(e).__name__}: {e}") from None
            except httpcore.ProtocolError as e:
                raise _Refused(f"the server broke HTTP: {e}") from None
        raise _Refused(f"more than {MAX_REDIRECTS} redirects")
