"""The loader fetches URLs without becoming a way into its own network (SSRF): non-public addresses,
however spelt or redirected to, are refused before anything is read; a slow server cannot hold a
worker; errors that cannot heal are not retried; a URL's password never shows. A real local server."""

from __future__ import annotations

import http.server
import threading
import time
from typing import ClassVar

import pytest

from shared.errors import ConfigError, DocumentError
from workers.fetch import FetchPolicy, fetch
from workers.load import load_batch

SECRET = b"<html><body><main><p>the internal secret</p></main></body></html>"


class _Internal(http.server.BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []

    def do_GET(self):
        _Internal.hits.append(self.path)
        if self.path == "/secret":
            self._send(200, SECRET, "text/html")
        elif self.path.startswith("/redirect"):
            self.send_response(302)
            self.send_header("Location", self.path.split("to=", 1)[1])
            self.end_headers()
        elif self.path == "/drip":
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            for _ in range(60):  # a byte every half second: a minute, unless the client gives up
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.5)
        else:
            self._send(404, b"no such page", "text/plain")

    def _send(self, status, body, kind):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def port():
    server = http.server.ThreadingHTTPServer(("0.0.0.0", 0), _Internal)  # every loopback address
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def refused(uri: str, policy: FetchPolicy | None = None) -> str:
    with pytest.raises(DocumentError) as caught:
        fetch(uri, 10**6, policy)
    assert caught.value.reason == "source_error", caught.value.message
    return caught.value.message


def test_non_public_addresses_are_refused_however_they_are_written(port):
    _Internal.hits.clear()
    for host in ("127.0.0.1", "localhost", "2130706433", "[::ffff:127.0.0.1]", "[::1]", "0.0.0.0", "169.254.169.254"):
        # 2130706433: 127.0.0.1 as one number; ::ffff:127.0.0.1: IPv4-mapped; 169.254.169.254: cloud metadata
        assert "not a public address" in refused(f"http://{host}/secret"), host
    for uri in ("http://10.0.0.1/", "http://192.168.1.1/", "https://[fe80::1]/"):
        assert "not a public address" in refused(uri)
    assert "port" in refused(f"http://127.0.0.1:{port}/secret")  # and a port of its own, besides
    assert _Internal.hits == []  # nothing was even asked


def test_redirects_are_checked_and_allowed_hosts_fetch(port):
    _Internal.hits.clear()
    allow_one = FetchPolicy.parse("127.0.0.2")  # an opted-in host that redirects to one that is not
    message = refused(f"http://127.0.0.2:{port}/redirect?to=http://127.0.0.1:{port}/secret", allow_one)
    assert "127.0.0.1" in message and "/secret" not in _Internal.hits
    body, kind = fetch(f"http://127.0.0.2:{port}/redirect?to=/secret", 10**6, allow_one)  # same host: fine
    assert body == SECRET and kind == "text/html"
    with pytest.raises(ConfigError):
        FetchPolicy.parse("not a host!")


def test_a_slow_server_cannot_hold_a_worker_and_a_404_is_not_retried(port):
    policy = FetchPolicy.parse("127.0.0.1", deadline_s=2)
    started = time.monotonic()
    assert "took longer" in refused(f"http://127.0.0.1:{port}/drip", policy)
    assert time.monotonic() - started < 30  # a deadline, not the server's minute
    _Internal.hits.clear()
    message = refused(f"http://alice:hunter2@127.0.0.1:{port}/missing", policy)
    assert "404" in message and "hunter2" not in message and "alice:***@" in message
    assert _Internal.hits == ["/missing"]  # asked once: a 404 does not heal


def test_the_loader_keeps_internal_answers_out_of_the_store(port):
    docs, dead = load_batch(
        [
            {"id": "internal", "uri": f"http://127.0.0.1:{port}/secret"},
            {"id": "metadata", "uri": "http://169.254.169.254/latest/meta-data/iam/"},
            {"id": "good", "text": "Public words only."},
        ],
        10**6,
    )
    assert [d.id for d in docs] == ["good"] and all(b"secret" not in d.text.encode() for d in docs)
    assert {(d.doc_id, d.reason) for d in dead} == {("internal", "source_error"), ("metadata", "source_error")}
