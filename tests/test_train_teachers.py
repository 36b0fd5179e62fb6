"""The teacher server client's retries: a replica that restarts (503, refused connections) costs a
pause, a request the server refuses (400) fails at once with the server's message. The answers
are vLLM's ``/v1/completions`` shape; the real server is exercised in test_train_online_vllm."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from lopd.train.teachers import ServerTeacher, TeacherError


class Flaky(BaseHTTPRequestHandler):
    """Answers ``failures`` 503s (or ``status``) first, then a vLLM-shaped completion."""

    failures = 2
    status = 503
    calls: list[str] = []

    def log_message(self, *args) -> None:
        pass

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.calls.append(self.path)
        self._send(200, {"data": [{"id": "teacher"}]})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.calls.append(self.path)
        if type(self).failures > 0:
            type(self).failures -= 1
            self._send(self.status, {"error": {"message": f"status {self.status}"}})
            return
        choices = [{"index": i, "prompt_logprobs": [None] + [{str(t): {"logprob": -0.5 * k}} for k, t in
                                                              enumerate(ids[1:], 1)]}
                   for i, ids in enumerate(body["prompt"])]
        self._send(200, {"choices": choices})


@pytest.fixture
def server():
    Flaky.calls = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    srv.shutdown()


def test_server_teacher_retries_5xx_then_scores(server):
    Flaky.failures, Flaky.status = 2, 503
    client = ServerTeacher(f"http://127.0.0.1:{server.server_port}", retries=3, backoff_s=0.01)
    got = client.score([[1, 2]], [[3, 4, 5]])
    np.testing.assert_array_equal(got[0], np.array([-1.0, -1.5, -2.0], np.float32))
    assert Flaky.calls.count("/v1/completions") == 3


def test_server_teacher_gives_up_after_its_retries(server):
    Flaky.failures, Flaky.status = 5, 502
    client = ServerTeacher(f"http://127.0.0.1:{server.server_port}", retries=2, backoff_s=0.01)
    with pytest.raises(TeacherError, match=r"^opd\.online\.teacher_url: .*/v1/completions: HTTP 502: status 502$"):
        client.score([[1, 2]], [[3]])
    assert Flaky.calls.count("/v1/completions") == 3


def test_server_teacher_does_not_retry_a_refused_request(server):
    Flaky.failures, Flaky.status = 1, 400
    client = ServerTeacher(f"http://127.0.0.1:{server.server_port}", retries=3, backoff_s=0.01)
    with pytest.raises(TeacherError, match=r"HTTP 400: status 400$"):
        client.score([[1, 2]], [[3]])
    assert Flaky.calls.count("/v1/completions") == 1
