"""Methods other than GET and HEAD are refused by Apache itself (the shipped
apache/methods.conf), for real: 405 with `Allow: GET, HEAD`, before mod_wsgi hands
the request to dynimg and without reading the body, so clients that send large
bodies slowly cannot hold the server's threads."""

import http.client
import re
import selectors
import shutil
import socket
import threading
import time
import uuid

import pytest

from conftest import ModWsgiExpress, shared_tempdir, write_config

REFUSED = ("POST", "PUT", "DELETE", "OPTIONS", "PATCH", "PROPFIND", "BREW")
IMAGE = "/images/photo-medium-1.jpg?width=310"


@pytest.fixture(scope="module")
def apache(image_root):
    """mod_wsgi-express as `make serve` runs it: methods.conf and Apache's cache in
    front, 2 processes x 16 threads; dynimg logs a line for each request it handles."""
    folder = shared_tempdir("dynimg-methods-")
    try:
        server = ModWsgiExpress(write_config(folder, image_root, server={"log_level": "INFO"}),
                                front_cache=True)
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def request(server, method, path, body=None, headers=None, timeout=10):
    """(status, every Allow header, raw body) of one request on its own connection."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.msg.get_all("Allow") or [], response.read()
    finally:
        connection.close()


def dynimg_lines(server, method, token):
    """dynimg's own log lines for a request with `token` in its URL (Apache's own
    messages, which carry an AHnnnnn id, are not dynimg's)."""
    return [line for line in server.log().splitlines()
            if token in line and method in line and not re.search(r"AH\d{5}", line)]


def wait_for_log_line(server, method, token, seconds=10):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if dynimg_lines(server, method, token):
            return
        time.sleep(0.05)
    pytest.fail(f"dynimg never logged {method} {token}")


def cached(server, path, seconds=10):
    """Ask until Apache's cache answers `path` itself."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.get(path).headers.get("X-Cache", "").startswith("HIT"):
            return
        time.sleep(0.05)
    pytest.fail(f"{path} never became a hit in Apache's cache")


def test_other_methods_get_405_from_apache_without_reaching_dynimg(apache):
    tokens = {}
    for method in REFUSED:
        token = f"refused-{method.lower()}-{uuid.uuid4().hex}"
        tokens[method] = token
        for path in (f"/images/{token}.jpg", f"/images/?name={token}.jpg"):
            body = b"x" * 100 if method in ("POST", "PUT", "PATCH") else None
            status, allow, content = request(apache, method, path, body=body)
            assert (status, allow, content) == (405, ["GET, HEAD"], b""), (method, path)
    # dynimg logs a request it handles: once this one shows, the others would have
    control = f"allowed-{uuid.uuid4().hex}"
    assert request(apache, "GET", f"/images/{control}.jpg")[0] == 404
    wait_for_log_line(apache, "GET", control)
    for method, token in tokens.items():
        assert dynimg_lines(apache, method, token) == [], method


def test_trace_is_refused_without_echoing_the_request(apache):
    secret = f"secret-{uuid.uuid4().hex}"
    for path in ("/images/photo-medium-1.jpg", "/images/?name=photo-medium-1.jpg"):
        status, allow, content = request(apache, "TRACE", path, headers={"X-Secret": secret})
        assert (status, allow) == (405, ["GET, HEAD"])
        assert secret.encode() not in content


def test_get_and_head_still_reach_dynimg(apache):
    status, _, content = request(apache, "GET", "/images/_health")
    assert status == 200 and content
    get = apache.get("/images/photo-medium-1.jpg?width=120")
    head = request(apache, "HEAD", "/images/photo-medium-1.jpg?width=120")
    assert get.status == head[0] == 200
    assert head[2] == b""
    # the rule that refuses bodies reads no request header into the answer's Vary
    assert not {"Content-Length", "Transfer-Encoding"} & {
        name.strip() for name in get.headers.get("Vary", "").split(",")}


class SlowBodies:
    """`count` requests that announce a large body and send it a byte every
    `interval` seconds, on a thread of their own, until each has an answer or
    `seconds` have passed."""

    def __init__(self, port, path, method="POST", count=24, interval=0.5, seconds=8):
        self.port, self.path, self.interval, self.seconds = port, path, interval, seconds
        self.method = method
        self.count = count
        self.started = threading.Event()
        # socket index -> (status line, seconds after the headers, body bytes sent)
        self.answers = {}
        self.closed = set()  # indexes the server closed
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.thread.start()
        if not self.started.wait(10):
            pytest.fail("slow clients could not connect")
        return self

    def __exit__(self, *exc):
        self.thread.join(self.seconds + 5)

    def _run(self):
        head = (f"{self.method} {self.path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                "Content-Type: application/octet-stream\r\nContent-Length: 100000\r\n\r\n")
        sockets, sent, begun, received = [], [], [], []
        selector = selectors.DefaultSelector()
        try:
            for index in range(self.count):
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                sock.sendall(head.encode())
                begun.append(time.monotonic())
                sock.setblocking(False)
                sockets.append(sock)
                sent.append(0)
                received.append(b"")
                selector.register(sock, selectors.EVENT_READ, index)
            self.started.set()
            deadline = time.monotonic() + self.seconds
            next_byte = time.monotonic() + self.interval
            while len(self.closed) < self.count and time.monotonic() < deadline:
                for key, _ in selector.select(timeout=max(0.0, next_byte - time.monotonic())):
                    index = key.data
                    try:
                        data = sockets[index].recv(65536)
                    except OSError:
                        data = b""
                    if data and index not in self.answers and b"\r\n" in received[index] + data:
                        self.answers[index] = ((received[index] + data).split(b"\r\n")[0].decode(),
                                               time.monotonic() - begun[index], sent[index])
                    received[index] += data
                    if not data:
                        self.closed.add(index)
                        selector.unregister(sockets[index])
                if time.monotonic() >= next_byte:
                    next_byte += self.interval
                    for index, sock in enumerate(sockets):
                        if index not in self.answers and index not in self.closed:
                            try:
                                sent[index] += sock.send(b"x")
                            except OSError:
                                self.closed.add(index)
        finally:
            self.started.set()
            selector.close()
            for sock in sockets:
                sock.close()


@pytest.mark.parametrize("method, answer", [("POST", "405 Method Not Allowed"),
                                            ("GET", "413 Request Entity Too Large")])
def test_slow_bodies_neither_hold_threads_nor_get_read(apache, method, answer):
    """24 clients trickling bodies (more than
    mod_wsgi-express's 20 Apache workers) while others ask for images."""
    cached(apache, IMAGE)
    # sent to an image not in Apache's cache (a cached one is answered from there at
    # once, and the body never read either): the refusal must come from the rules
    with SlowBodies(apache.port, IMAGE.replace("310", "311"), method) as slow:
        timings = {}
        for path in ("/images/_health", IMAGE):
            began = time.monotonic()
            reply = apache.get(path, timeout=10)
            timings[path] = time.monotonic() - began
            assert reply.status == 200, path
        assert reply.headers["X-Cache"].startswith("HIT")
    assert all(seconds < 1 for seconds in timings.values()), timings
    assert sorted(slow.answers) == list(range(slow.count))
    for status, seconds, body_bytes in slow.answers.values():
        assert status == "HTTP/1.1 " + answer
        assert seconds < 2
        assert body_bytes <= 4  # answered on the headers, not after the body
    assert slow.closed == set(range(slow.count))  # and the connections closed
    # a refused request leaves Apache's copy as it was
    assert apache.get(IMAGE).headers["X-Cache"].startswith("HIT")
