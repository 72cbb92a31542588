"""Hardening: paths, signed URLs, cost limits, remote sources, headers, render
slots, and fuzzing of the parser and the whole app."""

import concurrent.futures
import http.server
import io
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import zlib

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

import dynimg
from conftest import PROJECT, App, write_config

# --- paths ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fenced(tmp_path_factory):
    """An image root with a private sibling sharing its prefix, and symlinks out."""
    top = tmp_path_factory.mktemp("fence")
    root, private = top / "images", top / "images-private"
    root.mkdir()
    private.mkdir()
    with open(os.path.join(dynimg.os.path.dirname(__file__), "..", "samples", "wine.jpg"),
              "rb") as photo:
        data = photo.read()
    (private / "secret.jpg").write_bytes(data)
    (root / "ok.jpg").write_bytes(data)
    (root / "link.jpg").symlink_to(private / "secret.jpg")
    (root / "linkdir").symlink_to(private)
    (top / "secret.jpg").write_bytes(data)
    return str(root), data


ATTACKS = [
    "/../secret.jpg", "/../images-private/secret.jpg", "/link.jpg", "/linkdir/secret.jpg",
    "/..%2fsecret.jpg", "/%2e%2e/secret.jpg", "/%252e%252e/secret.jpg", "/....//secret.jpg",
    "/..\\secret.jpg", "/..%5csecret.jpg", "/%c0%ae%c0%ae/secret.jpg", "//etc/passwd",
    "/ok.jpg%00.png", "/ok.jpg\x00",
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_no_name_reaches_outside_the_image_root(fenced, tmp_path, attack):
    root, _ = fenced
    app = App(dynimg.load_config(write_config(str(tmp_path), root)))
    # as a server hands it over: percent-decoded once, the bytes as latin-1
    path = urllib.parse.unquote_to_bytes(attack).decode("latin-1")
    # and as ?name=, percent-encoded as sent (the query is decoded once too)
    query = "name=" + urllib.parse.quote(attack[1:], safe="%/")
    for reply in (app.request_raw(path), app.request("/", query)):
        assert reply.status in (400, 404), (attack, reply.status)
        assert reply.status != 404 or reply.headers["Content-Type"].startswith("image/")


def test_the_fenced_root_itself_still_serves(fenced, tmp_path):
    root, _ = fenced
    app = App(dynimg.load_config(write_config(str(tmp_path), root)))
    assert app.request("/ok.jpg", "width=50").status == 200


@pytest.mark.parametrize("name", ["a" * 256 + ".jpg", "/".join(["d" * 250] * 5) + "/a.jpg",
                                  "%C3%A9" * 130 + ".jpg"])
def test_names_no_file_system_holds_are_400(app, name):
    for reply in (app.request("/" + urllib.parse.unquote(name)),
                  app.request("/", "name=" + name)):
        assert reply.status == 400 and reply.text.startswith("name: too long")


@pytest.mark.parametrize("attack", ["/images/../../etc/passwd", "/images/%2e%2e/%2e%2e/etc/passwd",
                                    "/images/..%2f..%2fetc%2fpasswd", "/images/%c0%ae%c0%ae/x",
                                    "/images/?name=..%2f..%2fetc%2fpasswd"])
def test_traversal_over_http_never_leaks(server, attack):
    reply = server.get(attack)
    assert reply.status in (400, 404)
    assert b"root:" not in reply.body


# --- signed URLs ------------------------------------------------------------------


@pytest.fixture
def signed_app(image_root, tmp_path):
    config = dynimg.load_config(write_config(str(tmp_path), image_root,
                                             security={"signing_key": "new-key old-key"}))
    return App(config), config


def test_requests_without_a_valid_signature_are_403(signed_app):
    app, _ = signed_app
    assert app.request("/photo-medium-1.jpg", "width=100").status == 403
    reply = app.request("/photo-medium-1.jpg", "width=100&sig=" + "0" * 64)
    assert reply.status == 403 and reply.text.startswith("sig:")
    for hostile in ("%C3%A9" * 32, "", "%00"):
        assert app.request("/photo-medium-1.jpg", "width=100&sig=" + hostile).status in (400, 403)
    assert app.request("/_demo", "name=photo-medium-1.jpg").status == 403


@pytest.mark.parametrize("key", ["new-key", "old-key"])
def test_a_signature_by_any_listed_key_is_accepted(signed_app, key):
    app, _ = signed_app
    query = "width=100&format=webp"
    signature = dynimg.sign("/photo-medium-1.jpg", query, key)
    reply = app.request("/photo-medium-1.jpg", f"{query}&sig={signature}")
    assert reply.status == 200
    # parameter order does not matter; any change of a value does
    reordered = f"format=webp&sig={signature}&width=100"
    assert app.request("/photo-medium-1.jpg", reordered).status == 200
    assert app.request("/photo-medium-1.jpg", f"width=101&format=webp&sig={signature}").status \
        == 403


def test_the_canonical_form_is_as_documented():
    assert dynimg.canonical_request("/a b.jpg", "w=3&sig=x&bg=fff&q=5") \
        == "/a b.jpg?bg=fff&q=5&w=3"
    digest = dynimg.sign("/x.jpg", "width=300", "secret")
    import hashlib
    import hmac
    assert digest == hmac.new(b"secret", b"/x.jpg?width=300", hashlib.sha256).hexdigest()


def test_sign_command_prints_a_url_the_server_accepts(signed_app):
    app, config = signed_app
    result = subprocess.run([sys.executable, os.path.join(PROJECT, "dynimg.py"), "--config",
                             config.path, "sign", "/images/photo-medium-1.jpg?width=300"],
                            capture_output=True, text=True, check=True)
    url = result.stdout.strip()
    path, _, query = url.partition("?")
    assert app.request(path.removeprefix("/images"), query).status == 200


# --- cost limits ------------------------------------------------------------------


def test_allowed_widths_and_max_dpr(image_root, tmp_path):
    config = dynimg.load_config(write_config(str(tmp_path), image_root, limits={
        "allowed_widths": "320 640", "max_dpr": "2"}))
    app = App(config)
    assert app.request("/photo-medium-2.jpg", "width=320").status == 200
    refused = app.request("/photo-medium-2.jpg", "width=321")
    assert refused.status == 400 and "320, 640" in refused.text
    assert app.request("/photo-medium-2.jpg", "width=320&dpr=4&bandwidth=wifi").image().width \
        == 640


def png_chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def write_bad(image_root, name, data):
    with open(os.path.join(image_root, name), "wb") as file:
        file.write(data)
    os.chmod(os.path.join(image_root, name), 0o644)


def test_png_text_chunk_bomb_is_refused_quickly(app, image_root):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, "PNG")
    png = buffer.getvalue()
    bomb = png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"A" * 50_000_000, 9))
    write_bad(image_root, "text-bomb.png", png[:33] + bomb + png[33:])
    started = time.monotonic()
    reply = app.request("/text-bomb.png", "width=8")
    assert time.monotonic() - started < 5
    assert reply.status in (200, 422)


def gif(width, height, frames, frame_size=None):
    """A GIF with `frames` tiny frames (or frames declaring `frame_size`)."""
    header = (b"GIF89a" + struct.pack("<HH", width, height) + b"\x80\x00\x00"
              + b"\x00\x00\x00\xff\xff\xff")
    frame = (b"\x21\xf9\x04\x00\x01\x00\x00\x00"  # graphic control: 10 ms
             + b"\x2c\x00\x00\x00\x00" + struct.pack("<HH", *(frame_size or (1, 1)))
             + b"\x00\x02\x02\x44\x01\x00")
    return header + frame * frames + b"\x3b"


@pytest.mark.parametrize("name, data", [
    ("frames-bomb.gif", gif(16, 16, 200_000)),
    ("frame-size-bomb.gif", gif(16, 16, 2, frame_size=(65535, 65535))),
])
def test_frame_bombs_answer_in_bounded_time(app, image_root, name, data):
    write_bad(image_root, name, data)
    started = time.monotonic()
    reply = app.request("/" + name, "width=16")
    assert time.monotonic() - started < 5
    assert reply.status in (200, 422)


# --- remote sources ---------------------------------------------------------------


class Origin(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients that give up (the timeout tests) are expected


def origin_handler(photo):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path == "/photo.jpg":
                self.answer(200, photo)
            elif self.path == "/redirect":
                self.redirect("/photo.jpg")
            elif self.path == "/redirect-out":
                self.redirect("http://forbidden.example/photo.jpg")
            elif self.path == "/loop":
                self.redirect("/loop")
            elif self.path == "/slow":
                time.sleep(3)
                self.answer(200, photo)
            elif self.path == "/huge":
                self.send_response(200)
                self.end_headers()
                for _ in range(400):
                    self.wfile.write(b"\0" * 65536)
            elif self.path == "/broken":
                self.answer(500, b"oops")
            else:
                self.answer(404, b"no")

        def answer(self, status, body):
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def redirect(self, location):
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()
    return Handler


@pytest.fixture(scope="module")
def origin(corpus):
    with open(os.path.join(corpus, "photo-medium-1.jpg"), "rb") as file:
        server = Origin(("127.0.0.1", 0), origin_handler(file.read()))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture
def remote_app(image_root, tmp_path):
    def make(**remote):
        settings_ = {"allowed_hosts": "127.0.0.1 localhost *.images.test",
                     "allowed_networks": "127.0.0.0/8", "read_timeout": "1",
                     "connect_timeout": "1"}
        settings_.update(remote)
        config = dynimg.load_config(write_config(str(tmp_path), image_root, remote=settings_,
                                                 limits={"max_source_bytes": "5000000"}))
        return App(config)
    return make


def remote(app, url, query="width=120"):
    return app.request("/", f"url={urllib.parse.quote(url, safe='')}&{query}")


@pytest.mark.parametrize("path, status", [
    ("/photo.jpg", 200), ("/redirect", 200), ("/redirect-out", 403), ("/loop", 502),
    ("/slow", 504), ("/huge", 422), ("/missing", 404), ("/broken", 502),
])
def test_remote_sources_follow_the_policy(remote_app, origin, path, status):
    app = remote_app()
    started = time.monotonic()
    reply = remote(app, f"http://127.0.0.1:{origin}{path}")
    assert reply.status == status, reply.headers.get("X-Image-Error")
    assert time.monotonic() - started < 6
    if status == 200:
        assert reply.image().width == 120
    elif status != 403:
        assert reply.headers["Content-Type"].startswith("image/")
    if status >= 500:  # a passing failure of the origin is never replayed by a cache
        assert reply.headers["Cache-Control"] == "no-store"


@pytest.mark.parametrize("url, status", [
    ("http://elsewhere.test/photo.jpg", 403),
    ("ftp://127.0.0.1/photo.jpg", 400),
    ("file:///etc/passwd", 400),
    ("http:///photo.jpg", 400),
    ("http://127.0.0.1:99999/photo.jpg", 400),
    ("http://[::1/photo.jpg", 400),
])
def test_remote_urls_off_policy_are_refused(remote_app, url, status):
    assert remote(remote_app(), url).status == status


def test_loopback_is_refused_unless_explicitly_allowed(remote_app, origin):
    app = remote_app(allowed_networks="")
    reply = remote(app, f"http://127.0.0.1:{origin}/photo.jpg")
    assert reply.status == 403 and "address" in reply.text


def test_remote_refused_connection_is_502(remote_app):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert remote(remote_app(), f"http://127.0.0.1:{port}/photo.jpg").status == 502


def test_the_host_is_resolved_once_and_the_checked_address_is_used(remote_app, origin,
                                                                    monkeypatch):
    answers = ["127.0.0.1", "10.9.9.9"]  # a rebinding DNS: safe first, then not
    lookups = []
    real = socket.getaddrinfo

    def rebinding(host, port, *args, **kwargs):
        if host == "cdn.images.test":
            lookups.append(host)
            return real(answers[min(len(lookups), 2) - 1], port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    reply = remote(remote_app(), f"http://cdn.images.test:{origin}/photo.jpg")
    assert reply.status == 200 and len(lookups) == 1


def test_is_public_address_table():
    assert dynimg.is_public_address("93.184.216.34")
    for address in ("127.0.0.1", "10.0.0.1", "192.168.1.1", "172.16.0.1", "169.254.169.254",
                    "::1", "fe80::1", "224.0.0.1", "0.0.0.0", "fc00::1"):
        assert not dynimg.is_public_address(address), address


# --- responses --------------------------------------------------------------------


@pytest.mark.parametrize("query, headers", [
    ("width=1%0d%0aSet-Cookie:%20x=1", {}),
    ("na%0d%0ame=1", {}),
    ("name=a%0d%0aX-Evil:%201.jpg", {}),
    ("width=100", {"ECT": "2g\r\nX-Evil: 1"}),
    ("bandwidth=2g%0d%0aX:1", {}),
])
def test_nothing_from_the_request_is_echoed_into_a_header(app, query, headers):
    reply = app.request("/photo-medium-1.jpg" if "name" not in query else "/", query,
                        headers=headers)
    assert reply.status < 500
    for name, value in reply.headers.items():
        assert "\r" not in value and "\n" not in value and "Evil" not in name
    if reply.headers["Content-Type"].startswith("text/"):
        assert reply.text.count("\n") == 1 and len(reply.text) < 400


# --- bounded work -------------------------------------------------------------------


def test_renders_beyond_the_slots_get_503_and_hits_do_not_wait(image_root, tmp_path,
                                                               monkeypatch):
    config = dynimg.load_config(write_config(str(tmp_path), image_root, limits={
        "max_concurrent_renders": "1", "queue_timeout": "0.3"}))
    app = App(config)
    assert app.request("/photo-medium-1.jpg", "width=99").status == 200  # now cached
    # the 404 picture fitted to width=99 is rendered and cached like any image
    assert app.request("/nothing.jpg", "width=99").status == 404
    original = dynimg.render_opened
    entered = threading.Event()

    def slow(*args, **kwargs):
        entered.set()
        time.sleep(1.5)
        return original(*args, **kwargs)

    monkeypatch.setattr(dynimg, "render_opened", slow)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(app.request, "/photo-medium-2.jpg", "width=98")
        entered.wait(5)
        busy = app.request("/photo-medium-2.jpg", "width=97")
        started = time.monotonic()
        hit = app.request("/photo-medium-1.jpg", "width=99")
        quick = time.monotonic() - started
        started = time.monotonic()
        missing = app.request("/nothing.jpg", "width=99")  # its picture is a hit: no slot
        quick_missing = time.monotonic() - started
        # a picture not made yet needs a slot like any render: none comes free in time
        unfitted = app.request("/nothing.jpg", "width=96")
        assert first.result().status == 200
    assert busy.status == 503 and busy.headers["Retry-After"]
    assert busy.headers["Cache-Control"] == "no-store"
    assert hit.status == 200 and quick < 1.0
    assert missing.status == 404 and missing.headers["Content-Type"] == "image/jpeg"
    assert quick_missing < 1.0
    assert unfitted.status == 503 and unfitted.headers["Cache-Control"] == "no-store"
    assert app.request("/nothing.jpg", "width=96").status == 404  # once a slot is free


# --- fuzzing --------------------------------------------------------------------------

PARAMETER_NAMES = st.sampled_from(sorted(dynimg.PARAMETERS) + ["w", "h", "q", "zz", ""])
VALUES = st.one_of(st.text(max_size=12), st.integers(-10, 100000).map(str),
                   st.sampled_from(["2g", "cover", "auto", "fff", "mobile", "360x800", "nan",
                                    "1e9", "../x", "%00", "photo-medium-1.jpg"]))
HINT_VALUES = st.one_of(st.text(max_size=20), st.sampled_from(["2g", "4g", "on", "2.625",
                                                                 "1e400", "-1", "360"]))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pairs=st.lists(st.tuples(PARAMETER_NAMES, VALUES), max_size=6),
       hints=st.dictionaries(st.sampled_from(["ECT", "Downlink", "Save-Data", "Sec-CH-DPR",
                                              "DPR", "Viewport-Width", "Sec-CH-Width",
                                              "Accept"]), HINT_VALUES, max_size=4))
def test_parse_spec_never_fails_other_than_with_an_http_error(config, pairs, hints):
    environ = {"PATH_INFO": "/", "QUERY_STRING": urllib.parse.urlencode(pairs)}
    environ.update({"HTTP_" + k.upper().replace("-", "_"): v for k, v in hints.items()})
    try:
        spec = dynimg.parse_spec(dynimg.Request.from_environ(environ), config)
    except dynimg.HTTPError as error:
        assert error.status < 500
    else:
        assert spec.width is None or 1 <= spec.width <= config.max_width


@settings(max_examples=120, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=st.one_of(st.text(max_size=60), st.lists(st.tuples(PARAMETER_NAMES, VALUES),
                                                      max_size=5).map(urllib.parse.urlencode)),
       path=st.sampled_from(["/", "/photo-medium-1.jpg", "/tiny-1x1.png", "/missing.jpg",
                             "/not-image.jpg", "/_health", "/_x"]),
       hints=st.dictionaries(st.sampled_from(["ECT", "Save-Data", "DPR", "Width", "Accept",
                                              "If-None-Match", "If-Modified-Since"]),
                             HINT_VALUES, max_size=3))
def test_the_app_never_answers_5xx_to_any_query_or_hint(app, query, path, hints):
    safe_query = urllib.parse.quote(query, safe="=&%")
    reply = app.request(path, safe_query, headers=hints)
    assert reply.status < 500 or reply.status == 503


def mutations(data, seed, count):
    """Truncations, bit flips and shuffled chunks of a real file, reproducibly."""
    rng = random.Random(seed)
    for index in range(count):
        kind = index % 3
        if kind == 0:
            yield data[:rng.randrange(1, len(data))]
        elif kind == 1:
            mutated = bytearray(data)
            for _ in range(rng.randint(1, 20)):
                mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
            yield bytes(mutated)
        else:
            size = max(16, len(data) // 16)
            chunks = [data[i:i + size] for i in range(0, len(data), size)]
            head, rest = chunks[0], chunks[1:]
            rng.shuffle(rest)
            yield head + b"".join(rest)


MUTATED = ["photo-medium-1.jpg", "progressive.jpg", "png-alpha.png", "palette-trns.png",
           "webp-lossy.webp", "webp-alpha.webp", "anim.gif", "tiff.tif", "png-16bit.png",
           "icc-adobergb.jpg"]


@pytest.mark.parametrize("name", MUTATED)
def test_mutated_corpus_files_answer_200_or_422_in_bounded_time(app, image_root, name):
    with open(os.path.join(image_root, name), "rb") as file:
        data = file.read()
    statuses = {}
    for index, variant in enumerate(mutations(data, seed=name, count=30)):
        write_bad(image_root, f"mutant-{name}", variant)
        started = time.monotonic()
        reply = app.request(f"/mutant-{name}", f"width={100 + index}")
        assert time.monotonic() - started < 10, (name, index)
        assert reply.status in (200, 422), (name, index, reply.status)
        statuses[reply.status] = statuses.get(reply.status, 0) + 1
    assert sum(statuses.values()) == 30


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(query=st.text(max_size=80), path=st.text(max_size=20))
def test_signature_checking_never_fails_other_than_with_an_http_error(signed_app, query, path):
    _, config = signed_app
    environ = {"PATH_INFO": "/" + path.encode("utf-8", "surrogatepass").decode("latin-1"),
               "QUERY_STRING": urllib.parse.quote(query, safe="=&%")}
    with pytest.raises(dynimg.HTTPError) as raised:
        dynimg.check_signature(dynimg.Request.from_environ(environ), config)
    assert raised.value.status in (400, 403)


def test_cache_purge_takes_a_remote_sources_url(remote_app, origin):
    app = remote_app()
    url = f"http://127.0.0.1:{origin}/photo.jpg"
    for width in (100, 120):
        assert remote(app, url, f"width={width}").status == 200
    result = subprocess.run([sys.executable, os.path.join(PROJECT, "dynimg.py"), "--config",
                             app.config.path, "cache", "purge", url],
                            capture_output=True, text=True)
    assert result.returncode == 0 and f"removed 2 cached variants of {url}" in result.stdout
