"""The test servers' HTTP helper retries what Prefect's own client retries, and nothing else.

A local HTTP server on 127.0.0.1 answers with a scripted list of status codes.
"""

from __future__ import annotations

import json
import sys
import threading
import urllib.error
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import http_json  # noqa: E402


def scripted_server(codes: list[int]) -> tuple[ThreadingHTTPServer, list[str]]:
    """A server whose n-th request gets ``codes[n]`` (the last one repeats) with a JSON body;
    the methods it received are appended to the returned list."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_PATCH(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length))
            seen.append(self.command)
            code = codes[min(len(seen), len(codes)) - 1]
            payload = json.dumps({"answer": len(seen), "echo": body}).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args) -> None:  # keep the test output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


def test_a_busy_answer_is_retried_until_the_request_succeeds():
    server, seen = scripted_server([503, 503, 200])
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/work_pools/pool"
        answer = http_json("PATCH", url, {"concurrency_limit": 1})
    finally:
        server.shutdown()
    assert answer == {"answer": 3, "echo": {"concurrency_limit": 1}}
    assert seen == ["PATCH"] * 3


def test_another_error_is_not_retried():
    server, seen = scripted_server([404])
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/missing"
        with pytest.raises(urllib.error.HTTPError, match="404"):
            http_json("PATCH", url, {})
    finally:
        server.shutdown()
    assert seen == ["PATCH"]


def test_a_server_busy_past_the_retries_raises_its_error():
    server, seen = scripted_server([503])
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/busy"
        with pytest.raises(urllib.error.HTTPError, match="503"):
            http_json("PATCH", url, {}, retries=1)
    finally:
        server.shutdown()
    assert seen == ["PATCH", "PATCH"]  # one retry, then the error
