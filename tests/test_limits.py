"""No single request takes a worker down: output never beyond the limits, only the
allowed decoders, every render in a slot, remote fetches within a deadline, /_health
in constant time, keys from the effective output, checksummed cache entries, one
log line per request, and a hostile mix against the real server."""

import collections
import concurrent.futures
import http.server
import io
import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.parse
import zlib

import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image, ImageCms

import conftest
import dynimg
from conftest import App, ModWsgiExpress, shared_tempdir, write_config
from test_load import daemon_pids, peak_rss_mb

#: The bound on a daemon process's peak RSS under the hostile mix (README, "Limits
#: and safety", gives the measured figures).
RSS_BOUND_MB = 300

#: The most a request for a cached image may take while the server is attacked.
HIT_BOUND_SECONDS = 1.0


def poll(check, seconds=10, step=0.05):
    """check()'s first true value within `seconds`, else its last value."""
    deadline = time.monotonic() + seconds
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)


# --- hostile files, made from corpus photos where the corpus has no such file ----------


def fits_header(width, height):
    """A FITS file's header block declaring an 8-bit width x height image."""
    cards = [f"{'SIMPLE':8}= {'T':>20}", f"{'BITPIX':8}= {8:>20}", f"{'NAXIS':8}= {2:>20}",
             f"{'NAXIS1':8}= {width:>20}", f"{'NAXIS2':8}= {height:>20}", "END"]
    return "".join(card.ljust(80) for card in cards).ljust(2880).encode("ascii")


@pytest.fixture(scope="module")
def hostile_root(image_root, corpus):
    """hostile/ under the image root: a 940x2 strip of a real photo, files in formats
    outside the allow-list, a name with a space, and a loop of symbolic links."""
    folder = os.path.join(image_root, "hostile")
    os.makedirs(folder, exist_ok=True)
    os.chmod(folder, 0o755)
    with Image.open(os.path.join(corpus, "photo-medium-1.jpg")) as photo:
        photo = photo.convert("RGB")
    photo.resize((940, 400)).crop((0, 200, 940, 202)).save(os.path.join(folder, "strip.png"))
    photo.save(os.path.join(folder, "photo.ppm"))
    photo.save(os.path.join(folder, "photo.tga"))
    photo.resize((64, 64)).save(os.path.join(folder, "photo.ico"))
    with open(os.path.join(folder, "declares-10000x10000.fits"), "wb") as fits:
        fits.write(fits_header(10000, 10000) + b"\0" * 2880)
    shutil.copy(os.path.join(corpus, "photo-medium-1.jpg"), os.path.join(folder, "my photo.jpg"))
    for name, data in stuffed_headers(corpus).items():
        with open(os.path.join(folder, name), "wb") as file:
            file.write(data)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o644)
    os.symlink("loop-b.jpg", os.path.join(folder, "loop-a.jpg"))
    os.symlink("loop-a.jpg", os.path.join(folder, "loop-b.jpg"))
    return image_root


def stuffed_headers(corpus):
    """Real files with 4 MB of legal but empty header items before their pixels:
    empty JPEG APP5 segments, empty PNG chunks, GIF comment blocks."""
    with open(os.path.join(corpus, "photo-medium-1.jpg"), "rb") as file:
        jpeg = file.read()
    with open(os.path.join(corpus, "png-alpha.png"), "rb") as file:
        png = file.read()
    with open(os.path.join(corpus, "anim.gif"), "rb") as file:
        gif = file.read()
    size = 4 * 1024 * 1024
    empty_chunk = struct.pack(">I", 0) + b"zzZz" + struct.pack(">I", zlib.crc32(b"zzZz"))
    screen = 13 + 3 * 2 ** ((gif[10] & 7) + 1)  # header, screen descriptor, palette
    comment = b"\x21\xfe" + (b"\xff" + b"c" * 255) * (size // 256) + b"\x00"
    return {"segments.jpg": jpeg[:2] + b"\xff\xe5\x00\x02" * (size // 4) + jpeg[2:],
            "chunks.png": png[:33] + empty_chunk * (size // 12) + png[33:],
            "comments.gif": gif[:screen] + comment + gif[screen:]}


class Origin(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients that give up are expected here


def origin_handler(photo, fits):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            if self.path == "/photo.jpg":
                self.answer(photo)
            elif self.path == "/image.fits":
                self.answer(fits)
            elif self.path == "/trickle-body":
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()
                self.trickle(b"\xff" * 200)
            elif self.path == "/trickle-headers":
                self.trickle(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\nX-Slow: " + b"a" * 200)

        def trickle(self, data):
            """A byte every 0.3 s, each within any read timeout; ends when the client goes."""
            for byte in data:
                try:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.3)

        def answer(self, body):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
    return Handler


@pytest.fixture(scope="module")
def origin(corpus):
    with open(os.path.join(corpus, "photo-medium-1.jpg"), "rb") as file:
        server = Origin(("127.0.0.1", 0), origin_handler(file.read(), fits_header(16, 16)
                                                         + b"\0" * 2880))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


#: Remote sources for these tests: this machine's loopback origin only, and quick limits.
REMOTE = {"allowed_hosts": "127.0.0.1", "allowed_networks": "127.0.0.0/8",
          "connect_timeout": "1", "read_timeout": "1", "total_timeout": "2"}


@pytest.fixture(scope="module")
def hostile_server(hostile_root, origin):
    """mod_wsgi-express with `make serve`'s processes and threads, but no cache in
    front: every answer, cached ones included, comes from dynimg itself."""
    folder = shared_tempdir("dynimg-hostile-")
    server = None
    try:
        server = ModWsgiExpress(write_config(folder, hostile_root, remote=REMOTE,
                                             server={"health_details": "yes"}))
        yield server
    finally:
        if server:
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def hostile_app(hostile_root, tmp_path):
    def make(**sections):
        sections.setdefault("remote", REMOTE)
        return App(dynimg.load_config(write_config(str(tmp_path), hostile_root, **sections)))
    return make


def image_size(reply):
    return tuple(int(side) for side in reply.headers["X-Image-Size"].split("x"))


def remote_query(origin, path, query="width=100"):
    url = urllib.parse.quote(f"http://127.0.0.1:{origin}{path}", safe="")
    return f"/images/?url={url}&{query}"


# --- 1. output never beyond max_width x max_height ------------------------------------


@pytest.mark.parametrize("path", [
    "/images/hostile/strip.png?width=4000&height=4000&fit=cover&upscale=1",
    "/images/hostile/strip.png?height=1000&upscale=1",
    "/images/hostile/strip.png?width=4000&height=4000&fit=pad&upscale=1",
    "/images/photo-large-portrait.jpg?width=4000&upscale=1",
    "/images/panorama.tif?height=4000&upscale=1",
    "/images/photo-large-1.jpg",
])
def test_no_output_is_larger_than_the_limits_over_http(hostile_server, path):
    daemons = daemon_pids(hostile_server.port)
    reply = hostile_server.get(path)
    assert reply.status == 200
    width, height = image_size(reply)
    assert width <= 4000 and height <= 4000
    assert reply.image().size == (width, height)
    assert daemon_pids(hostile_server.port) == daemons


def test_cover_of_a_strip_keeps_the_box_and_shows_a_part(hostile_app):
    app = hostile_app()
    reply = app.request("/hostile/strip.png", "width=4000&height=4000&fit=cover&upscale=1")
    assert reply.status == 200 and reply.image().size == (4000, 4000)
    spec = dynimg.parse_spec(dynimg.Request(path="/x.png", query="w=4000&h=4000&fit=cover"
                                            "&upscale=1"), app.config)
    plan = dynimg.plan_output(dynimg.Facts((940, 2), False), spec, app.config)
    assert plan.size == (4000, 4000)
    left, top, right, bottom = plan.region
    assert 0 <= left < right <= 940 and 0 <= top < bottom <= 2 and right - left == 2


SIDES = st.integers(1, 100000)


@settings(max_examples=400, deadline=None)
@given(source=st.tuples(SIDES, SIDES).filter(lambda size: size[0] * size[1] <= 10 ** 8),
       width=st.one_of(st.none(), st.integers(1, 4000)),
       height=st.one_of(st.none(), st.integers(1, 4000)),
       fit=st.sampled_from(sorted(dynimg.FITS)), upscale=st.booleans(),
       gravity=st.sampled_from(sorted(dynimg.GRAVITIES)), dpr=st.sampled_from(["1", "2.5", "4"]))
def test_every_plan_stays_within_the_limits_and_the_source(config, source, width, height, fit,
                                                           upscale, gravity, dpr):
    query = {"fit": fit, "upscale": str(int(upscale)), "gravity": gravity, "dpr": dpr}
    query.update({"width": width} if width else {})
    query.update({"height": height} if height else {})
    spec = dynimg.parse_spec(dynimg.Request(path="/x.jpg", query=urllib.parse.urlencode(query)),
                             config)
    plan = dynimg.plan_output(dynimg.Facts(source, False), spec, config)
    for size in (plan.size, plan.canvas):
        assert 1 <= size[0] <= config.max_width and 1 <= size[1] <= config.max_height
    left, top, right, bottom = plan.region
    assert -1e-6 <= left < right <= source[0] + 1e-6 and -1e-6 <= top < bottom <= source[1] + 1e-6


# --- 2. only the allowed decoders -------------------------------------------------------


@pytest.mark.parametrize("name", ["hostile/declares-10000x10000.fits", "hostile/photo.ppm",
                                  "hostile/photo.tga", "hostile/photo.ico"])
def test_formats_outside_the_allow_list_are_422_over_http(hostile_server, name):
    reply = hostile_server.get(f"/images/{urllib.parse.quote(name)}?width=100")
    assert reply.status == 422
    assert "not an image in a format this server reads" in reply.headers["X-Image-Error"]
    assert reply.headers["Content-Type"].startswith("image/")


def test_a_remote_fits_file_is_422(hostile_server, origin):
    reply = hostile_server.get(remote_query(origin, "/image.fits"))
    assert reply.status == 422
    assert "format this server reads" in reply.headers["X-Image-Error"]


def test_the_formats_key_narrows_what_is_decoded(hostile_app):
    app = hostile_app(limits={"formats": "jpeg"})
    assert app.request("/photo-medium-1.jpg", "width=50").status == 200
    refused = app.request("/photo-medium.png", "width=50")
    assert refused.status == 422 and refused.headers["X-Image-Error"].endswith("reads: jpeg")


def test_an_unknown_format_name_stops_start_up(hostile_root, tmp_path):
    path = write_config(str(tmp_path), hostile_root, limits={"formats": "jpeg fits"})
    with pytest.raises(dynimg.ConfigError, match=r"\[limits\] formats"):
        dynimg.load_config(path)


@pytest.mark.parametrize("name", ["segments.jpg", "chunks.png", "comments.gif"])
def test_a_header_stuffed_with_empty_items_is_422_over_http(hostile_server, name):
    reply = hostile_server.get(f"/images/hostile/{name}?width=100")
    assert reply.status == 422
    assert reply.headers["X-Image-Error"] == "source has an oversized header"


def test_a_bad_file_has_its_header_parsed_once(hostile_app, monkeypatch):
    app = hostile_app()
    probes = []
    probe = dynimg.probe_file
    monkeypatch.setattr(dynimg, "probe_file", lambda path, config: probes.append(path)
                        or probe(path, config))
    for width in (100, 101, 102):
        assert app.request("/hostile/segments.jpg", f"width={width}").status == 422
    assert [path for path in probes if path.endswith("segments.jpg")] == [probes[0]]


def test_a_render_is_judged_before_it_decodes_by_the_memory_it_takes(hostile_app, hostile_root,
                                                                   corpus):
    with Image.open(os.path.join(corpus, "photo-large-2.jpg")) as photo:
        photo.draft("RGB", (1068, 712))
        photo.convert("RGB").save(os.path.join(hostile_root, "hostile", "photo.jp2"))
    # (the apps share one result cache: the refusals first, as nothing is kept of them)
    tight = hostile_app(limits={"max_render_mb": "10"})
    refused = tight.request("/hostile/photo.jp2", "width=100")  # 1068x712 x 20 bytes: 15 MB
    assert refused.status == 422 and "max_render_mb" in refused.headers["X-Image-Error"]
    # a baseline JPEG counts at the size it is decoded at: 6028x3391 at 1/8 is 754x424
    assert tight.request("/photo-large-1.jpg", "width=3000").status == 422  # at 1/2
    assert tight.request("/photo-large-1.jpg", "width=300").status == 200
    # a progressive one keeps every full-size coefficient: 4272x2848 x 3 x 2 bytes
    assert tight.request("/photo-large-2.jpg", "width=100").status == 422
    roomier = hostile_app(limits={"max_render_mb": "80"})
    assert roomier.request("/hostile/photo.jp2", "width=100").status == 200
    assert roomier.request("/photo-large-2.jpg", "width=100").status == 200


@pytest.mark.parametrize("fmt, refused", [("avif", True), ("webp", False), ("jpeg", False)])
def test_the_answer_and_its_encoder_count_against_max_render_mb(hostile_app, fmt, refused):
    """However small the source, a 4000x4000 AVIF answer takes ~670 MB with its
    encoder: with 200 MB a render, a photo forced into that box is a 422 as AVIF, and
    renders in the formats whose encoders take a few bytes a pixel."""
    if fmt == "avif" and not dynimg.AVIF_ENCODER:
        pytest.skip("AVIF plugin not installed")
    reply = hostile_app(limits={"max_render_mb": "200"}).request(
        "/photo-medium-1.jpg", f"width=4000&height=4000&forcefit=1&format={fmt}")
    if refused:
        assert reply.status == 422 and "max_render_mb" in reply.headers["X-Image-Error"]
    else:
        assert reply.status == 200 and image_size(reply) == (4000, 4000)


def test_an_error_picture_too_large_to_fit_goes_out_as_it_is(hostile_app, caplog):
    if not dynimg.AVIF_ENCODER:
        pytest.skip("AVIF plugin not installed")
    with caplog.at_level("INFO", logger="dynimg"):
        dynimg.log.propagate = True
        try:
            reply = hostile_app().request("/nope.jpg",
                                          "width=4000&height=4000&forcefit=1&format=avif")
        finally:
            dynimg.log.propagate = False
    assert reply.status == 404 and reply.headers["Content-Type"] == "image/png"
    assert "not fitted" in caplog.text and "Traceback" not in caplog.text


AVIF_HOLES = r"""
import re, sys, threading, time
from PIL import Image
import dynimg
dynimg.tune_malloc()
if sys.argv[2] == "never":
    dynimg.RELEASE_INTERVAL_SECONDS = float("inf")
image = Image.open(sys.argv[1])
image.draft("RGB", (1068, 712))
image = image.convert("RGB")
slots = threading.Semaphore(2)


def encode(width):
    with slots:  # renders at once, as in a daemon process
        dynimg._save(image.resize((width, width * 2 // 3)), "avif", None, 70)


threads = [threading.Thread(target=encode, args=(300 + 50 * n,)) for n in range(16)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
time.sleep(dynimg.RELEASE_INTERVAL_SECONDS if sys.argv[2] == "rationed" else 0)
encode(64)  # the next AVIF encode, a second on: it releases what the others freed
print(int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read())[1]) // 1024)
"""


def test_memory_freed_by_avif_encodes_goes_back_to_the_system(corpus):
    """SVT-AV1 frees thousands of small buffers an encode, and without a release the
    holes stay in the process (bench/soak.py measured the growth)."""
    if not dynimg.AVIF_ENCODER:
        pytest.skip("AVIF plugin not installed")

    def rss_after(releases):
        return int(subprocess.run(
            [sys.executable, "-c", AVIF_HOLES, os.path.join(corpus, "photo-large-2.jpg"),
             releases], capture_output=True, text=True, check=True, cwd=conftest.PROJECT,
            env=dict(os.environ, PYTHONPATH=conftest.PROJECT)).stdout)
    held, released = rss_after("never"), rss_after("rationed")
    assert released < held - 20, (held, released)


def test_freed_memory_is_released_at_most_once_a_second(monkeypatch):
    releases = []
    monkeypatch.setattr(dynimg, "_malloc_trim", releases.append)
    monkeypatch.setattr(dynimg, "_last_release", 0.0)
    for _ in range(5):
        dynimg.release_freed_memory()
    assert releases == [0]
    monkeypatch.setattr(dynimg, "_last_release",
                        dynimg.time.monotonic() - dynimg.RELEASE_INTERVAL_SECONDS)
    dynimg.release_freed_memory()
    assert releases == [0, 0]


ENCODER_MEMORY = r"""
import io, re, sys
from PIL import Image
import dynimg
image = Image.open(sys.argv[2])
image.draft("RGB", (1500, 1000))
image = image.convert("RGB")
peak = lambda: int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read())[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # peak RSS from here on
before = peak()
dynimg._save(image, sys.argv[1], None, 80)
print((peak() - before) / (image.width * image.height))
"""


@pytest.mark.parametrize("fmt", ["avif", "webp"])
def test_the_encoder_memory_counted_is_what_the_encoder_takes(corpus, fmt):
    """ENCODER_BYTES_PER_PIXEL against the installed codec: encoding a photo of 1.5
    Mpx grows a fresh process by no more than it says (and AVIF's by more than a few
    bytes, or the figure would refuse answers for nothing)."""
    if fmt == "avif" and not dynimg.AVIF_ENCODER:
        pytest.skip("AVIF plugin not installed")
    measured = float(subprocess.run(
        [sys.executable, "-c", ENCODER_MEMORY, fmt, os.path.join(corpus, "photo-large-2.jpg")],
        capture_output=True, text=True,
        check=True, cwd=conftest.PROJECT, env=dict(os.environ, PYTHONPATH=conftest.PROJECT)
    ).stdout)
    assert measured <= dynimg.ENCODER_BYTES_PER_PIXEL[fmt]
    if fmt == "avif":
        assert measured >= dynimg.ENCODER_BYTES_PER_PIXEL[fmt] / 2


def exif_bomb(tags, size):
    """EXIF whose IFD0 has an orientation of 6, then `tags` entries all pointing at one
    `size`-byte range."""
    entries = [struct.pack("<HHIHH", 0x0112, 3, 1, 6, 0)]
    entries += [struct.pack("<HHII", 20000 + number, 1, size - 8, 8) for number in range(tags)]
    ifd = struct.pack("<H", len(entries)) + b"".join(entries) + b"\0\0\0\0"
    header = b"II*\0" + struct.pack("<I", size)
    return b"Exif\0\0" + header + b"\0" * (size - 8) + ifd


def test_an_exif_bomb_is_read_without_copying_its_tags(hostile_app, hostile_root, corpus,
                                                        monkeypatch):
    """5,300 tags over one 60 kB range: Pillow's reader would copy 320 MB."""
    with Image.open(os.path.join(corpus, "photo-medium-1.jpg")) as photo:
        photo.save(os.path.join(hostile_root, "hostile", "exif-bomb.jpg"),
                   exif=exif_bomb(5300, 60000)[:65000])  # one APP1 segment
        photo.save(os.path.join(hostile_root, "hostile", "exif-bomb.png"),
                   exif=exif_bomb(4000, 500000)[6:])
    def no_pillow_exif(*args):
        raise AssertionError("Pillow's EXIF reader was used")
    monkeypatch.setattr(Image.Image, "getexif", no_pillow_exif)
    app = hostile_app()
    for name in ("exif-bomb.jpg", "exif-bomb.png"):
        reply = app.request(f"/hostile/{name}", "width=200")
        assert reply.status == 200
    # the orientation (6) is read all the same: turned upright
    assert reply.image().size == (200, 300)


def test_a_transparent_colour_counts_in_the_memory_a_render_takes(hostile_app, hostile_root,
                                                                   corpus):
    with Image.open(os.path.join(corpus, "grayscale.jpg")) as photo:
        grey = photo.resize((1000, 1000))
    grey.save(os.path.join(hostile_root, "hostile", "grey-1000.png"))
    grey.save(os.path.join(hostile_root, "hostile", "grey-1000-trns.png"), transparency=0)
    app = hostile_app(limits={"max_render_mb": "5"})  # grey 2 MB; made LA first, 10 MB
    assert app.request("/hostile/grey-1000.png", "width=100").status == 200
    assert app.request("/hostile/grey-1000-trns.png", "width=100").status == 422


def test_a_jpeg_with_thousands_of_scans_is_422_before_decoding(hostile_app, hostile_root,
                                                               corpus):
    with open(os.path.join(corpus, "progressive.jpg"), "rb") as file:
        data = file.read()
    last_scan = data.rindex(b"\xff\xda")
    scans = data[:-2] + data[last_scan:-2] * 150 + b"\xff\xd9"  # the last scan again
    with open(os.path.join(hostile_root, "hostile", "scans.jpg"), "wb") as file:
        file.write(scans)
    app = hostile_app()
    started = time.monotonic()
    reply = app.request("/hostile/scans.jpg", "width=100")
    assert reply.status == 422 and "scans" in reply.headers["X-Image-Error"]
    assert time.monotonic() - started < 5
    assert app.request("/progressive.jpg", "width=100").status == 200


@pytest.mark.parametrize("query", ["width=%EF%BC%91", "height=%D9%A3", "dpr=%EF%BC%92",
                                   "screensize=%EF%BC%93x4", "gravity=fp:nan,nan",
                                   "gravity=nowhere&fit=contain"])
def test_one_spelling_of_each_value_and_no_value_ignored(app, query):
    """Digits of other scripts would be other URLs for one image (past any front
    cache); a gravity the fit does not use is still checked."""
    reply = app.request("/photo-medium-1.jpg", query)
    assert reply.status == 400


# --- 3. every render in a slot; error pictures cached -----------------------------------


def test_error_pictures_and_demo_tiles_wait_for_a_slot_and_are_cached(hostile_app):
    app = hostile_app(limits={"max_concurrent_renders": "1", "queue_timeout": "0.2"})
    slots = app.dynimg.slots.semaphore
    assert slots.acquire(timeout=1)  # every slot taken
    try:
        busy_404 = app.request("/nothing.jpg", "width=333&format=png")
        busy_422 = app.request("/not-image.jpg", "width=333")
        busy_demo = app.request("/_demo", "name=photo-medium-1.jpg&width=200")
    finally:
        slots.release()
    for reply in (busy_404, busy_422, busy_demo):
        assert reply.status == 503 and reply.headers["Retry-After"]
        assert reply.headers["Cache-Control"] == "no-store"
    first = app.request("/nothing.jpg", "width=333&format=png")
    demo = app.request("/_demo", "name=photo-medium-1.jpg&width=200")
    assert first.status == 404 and first.image().size[0] == 333 and demo.status == 200
    assert slots.acquire(timeout=1)
    try:  # now cached: no slot needed
        again = app.request("/nothing.jpg", "width=333&format=png")
        demo_again = app.request("/_demo", "name=photo-medium-1.jpg&width=200")
        other_name = app.request("/also-missing.jpg", "width=333&format=png")
    finally:
        slots.release()
    assert again.status == 404 and again.body == first.body
    assert demo_again.status == 200 and demo_again.body == demo.body
    assert other_name.status == 404 and other_name.body == first.body
    # the picture, and the demo's seven tiles (its own image, without hints, is the default one)
    assert app.dynimg.cache.counts["misses"] == 1 + 7


def test_a_render_that_finds_the_queue_full_is_turned_away_at_once(hostile_app):
    app = hostile_app(limits={"max_concurrent_renders": "1", "max_waiting_renders": "0",
                              "queue_timeout": "30"})
    assert app.request("/photo-medium-1.jpg", "width=90").status == 200  # cached now
    slots = app.dynimg.slots.semaphore
    assert slots.acquire(timeout=1)
    try:
        started = time.monotonic()
        busy = app.request("/photo-medium-1.jpg", "width=91")
        waited = time.monotonic() - started
        hit = app.request("/photo-medium-1.jpg", "width=90")
    finally:
        slots.release()
    assert busy.status == 503 and waited < 5  # not the 30 s queue_timeout
    assert hit.status == 200


# --- 4. remote fetches within total_timeout -----------------------------------------------


@pytest.mark.parametrize("path", ["/trickle-body", "/trickle-headers"])
def test_a_trickling_origin_is_cut_off_at_total_timeout(hostile_server, origin, path):
    total = float(REMOTE["total_timeout"])
    image = "/images/photo-medium-1.jpg?width=64&dpr=1.5"
    assert hostile_server.get(image).status == 200
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        started = time.monotonic()
        slow = [pool.submit(hostile_server.get, remote_query(origin, path, f"width={100 + n}"))
                for n in range(8)]
        image_reply = hostile_server.get(image)
        image_seconds = time.monotonic() - started
        replies = [future.result() for future in slow]
        elapsed = time.monotonic() - started
    assert [reply.status for reply in replies] == [504] * 8
    assert all(reply.headers["Cache-Control"] == "no-store" for reply in replies)
    # eight at once, all the daemons' threads, each cut off at the deadline (their
    # origin would take a minute): then the threads serve again
    assert elapsed < total + 4
    assert image_reply.status == 200 and image_seconds < total + 4


@pytest.fixture
def tls_origin(tmp_path, monkeypatch):
    """An https origin on 127.0.0.1 with a certificate this process trusts, that
    completes the handshake, then sends its status line a byte every 0.3 s."""
    cert, key = tmp_path / "origin.pem", tmp_path / "origin.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # read by each new default context
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle():
        connection, _ = listener.accept()
        given_up = time.monotonic() + 10  # a client without a deadline fails, not hangs
        with context.wrap_socket(connection, server_side=True) as tls:
            for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100:
                if stop.wait(0.3) or time.monotonic() > given_up:
                    return
                try:
                    tls.sendall(bytes([byte]))
                except OSError:
                    return
    server = threading.Thread(target=trickle, daemon=True)
    server.start()
    yield listener.getsockname()[1]
    stop.set()
    listener.close()
    server.join(5)


def test_the_deadline_holds_over_tls(hostile_app, tls_origin):
    app = hostile_app()
    url = urllib.parse.quote(f"https://127.0.0.1:{tls_origin}/x.jpg", safe="")
    started = time.monotonic()
    reply = app.request("/", f"url={url}&width=50")
    assert reply.status == 504
    assert time.monotonic() - started < float(REMOTE["total_timeout"]) + 2


# --- 5. /_health in constant time; trimming removes empty folders -------------------------


def test_health_never_walks_the_cache(hostile_app, monkeypatch):
    app = hostile_app(server={"health_details": "yes"})
    assert app.request("/photo-medium-1.jpg", "width=80").status == 200
    app.dynimg.cache.prune()

    def no_walking(*args, **kwargs):
        raise AssertionError("/_health walked the disk")
    listdir = dynimg.os.listdir

    def only_the_metrics_folder(folder=".", **kwargs):
        # the per-process metrics files are read (a bounded few); the cache never
        if folder != app.config.metrics_dir:
            no_walking()
        return listdir(folder)
    monkeypatch.setattr(dynimg.os, "walk", no_walking)
    monkeypatch.setattr(dynimg.os, "listdir", only_the_metrics_folder)
    monkeypatch.setattr(dynimg.os, "scandir", no_walking)
    health = json.loads(app.request("/_health").body)
    assert health["cache"]["entries_at_last_trim"] == 1
    assert health["cache"]["bytes_at_last_trim"] >= dynimg.DISK_BLOCK
    assert health["cache"]["misses"] == 1


def test_health_answers_from_its_figures_over_a_cache_of_many_entries(hostile_server):
    """As a load balancer's probe asks it (Varnish's shipped probe gives up after 2 s),
    with 20,000 entries the last trim has not counted: /_health reports the trim's
    figures (none yet), not a count it walked."""
    folder = os.path.join(os.path.dirname(hostile_server.log_path), "cache", "ff", "ff")
    os.makedirs(folder, exist_ok=True)
    for number in range(20000):
        open(os.path.join(folder, f"ffff{number:028x}.0.1x1.q80.s.0.00000000.jpeg"),
             "wb").close()
    started = time.monotonic()
    reply = hostile_server.get("/images/_health")
    assert reply.status == 200 and time.monotonic() - started < 1
    assert json.loads(reply.body)["cache"]["entries_at_last_trim"] is None
    shutil.rmtree(folder)  # the next tests' trims need not walk them


def test_trimming_removes_empty_fan_out_folders(hostile_app):
    app = hostile_app(cache={"cache_max_mb": "1"})
    for width in range(40, 60):
        assert app.request("/photo-medium-1.jpg", f"width={width}").status == 200
    cache = app.dynimg.cache
    cache.max_bytes = 0  # trim everything
    cache.prune()
    left = [folder for folder, subfolders, names in os.walk(cache.folder)
            if folder != cache.folder and ".locks" not in folder]
    assert left == []
    assert app.request("/photo-medium-1.jpg", "width=40").status == 200  # writes again


# --- 6. keys from the effective output; the bound counts blocks --------------------------


@pytest.mark.parametrize("name, first, second", [
    ("photo-medium-1.jpg", "width=300", "width=300&bg=000000"),
    ("photo-medium-1.jpg", "width=300", "width=300&upscale=1"),
    ("photo-medium-1.jpg", "width=300", "width=300&height=4000"),
    ("photo-medium-1.jpg", "width=300", "width=300&gravity=north"),
    ("photo-medium-1.jpg", "width=300&height=200&fit=cover", "width=300&height=200&fit=cover"
                                                             "&gravity=center"),
    ("photo-medium-1.jpg", "width=300&format=png", "width=300&format=png&q=20"),
    ("photo-medium-1.jpg", "", "width=4000"),
])
def test_parameters_that_change_nothing_make_no_new_key(app, name, first, second):
    one, two = app.request("/" + name, first), app.request("/" + name, second)
    assert one.status == two.status == 200
    assert one.headers["X-Image-Key"] == two.headers["X-Image-Key"]
    assert one.body == two.body


@pytest.mark.parametrize("name, first, second", [
    ("png-alpha.png", "width=200", "width=200&bg=000000"),
    ("photo-medium-1.jpg", "width=300&height=300&fit=pad", "width=300&height=300&fit=pad&bg=000"),
    ("photo-medium-1.jpg", "width=300&height=300&fit=cover", "width=300&height=300&fit=cover"
                                                             "&gravity=west"),
    ("photo-medium-1.jpg", "width=1600&upscale=1", "width=1600"),
])
def test_parameters_that_change_the_output_make_a_new_key(app, name, first, second):
    one, two = app.request("/" + name, first), app.request("/" + name, second)
    assert one.headers["X-Image-Key"] != two.headers["X-Image-Key"]
    assert one.body != two.body


def test_the_cache_bound_counts_disk_blocks(hostile_app):
    app = hostile_app(cache={"cache_max_mb": "1"})
    for width in range(1, 301):  # tiny answers: a few hundred bytes, a 4 KiB block each
        assert app.request("/photo-medium-1.jpg", f"width={width}&height=3").status == 200
    cache = app.dynimg.cache
    cache.prune()
    on_disk = sum(stat.st_blocks * 512 for _, entry, stat in cache.entries() if entry)
    lengths = sum(entry.length for _, entry, _ in cache.entries() if entry)
    assert on_disk <= cache.max_bytes * dynimg.PRUNE_TO < 300 * dynimg.DISK_BLOCK
    assert lengths < on_disk / 4  # counting lengths would have kept them all


# --- 8. no 500 from odd names; 5xx never stored --------------------------------------------


@pytest.mark.parametrize("path, statuses", [
    # Apache itself refuses a path part over 255 bytes (403) before dynimg sees it
    ("/images/" + "a" * 256 + ".jpg?width=50", {400, 403}),
    ("/images/?name=" + "a" * 256 + ".jpg&width=50", {400}),
    ("/images/?name=" + "a/" * 600 + "x.jpg&width=50", {400}),
    ("/images/hostile/loop-a.jpg?width=50", {404}),
    ("/images/?name=hostile/loop-a.jpg/x.jpg&width=50", {404}),
])
def test_long_names_and_link_loops_are_4xx_over_http(hostile_server, path, statuses):
    reply = hostile_server.get(path)
    assert reply.status in statuses


def test_a_5xx_is_not_replayed_by_apaches_cache_in_front(hostile_root):
    folder = shared_tempdir("dynimg-no-store-")
    server = None
    try:
        server = ModWsgiExpress(write_config(folder, hostile_root, remote=REMOTE),
                                front_cache=True)
        unreachable = remote_query(1, "/x.jpg")  # nothing listens on port 1: 502
        replies = []
        for _ in range(10):  # Apache would file a copy a moment after the first answer
            replies.append(server.get(unreachable))
            time.sleep(0.2)
        assert [reply.status for reply in replies] == [502] * 10
        assert not any(reply.headers.get("X-Cache", "").startswith("HIT") for reply in replies)
        # each one reached dynimg (it logs a line per request)
        assert poll(lambda: server.log().count(" 502 ") >= 10)
    finally:
        if server:
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)


def test_5xx_answers_are_never_stored_by_shared_caches(hostile_app, monkeypatch, origin):
    app = hostile_app()
    with monkeypatch.context() as patch:
        patch.setattr(dynimg, "PIPELINE", (lambda image, job: 1 / 0,))
        patch.setattr(dynimg.log, "disabled", True)
        bug = app.request("/photo-medium-1.jpg", "width=77")
    gateway = app.request("/", f"url={urllib.parse.quote(f'http://127.0.0.1:1/x.jpg')}&w=77")
    for reply, status in ((bug, 500), (gateway, 502)):
        assert reply.status == status
        assert reply.headers["Cache-Control"] == "no-store"
    assert app.request("/nothing.jpg", "width=77").headers["Cache-Control"].startswith("public")


# --- 9. request text cannot forge a log line ------------------------------------------------


def test_request_text_cannot_forge_a_log_line(hostile_server):
    reply = hostile_server.get("/images/x%0d%0aFORGED%20dynimg:%20line.jpg?width=1%0A2")
    assert reply.status in (400, 404)
    logged = poll(lambda: [line for line in hostile_server.log().splitlines()
                           if "FORGED" in line])
    assert logged and all("\\r\\nFORGED" in line for line in logged)
    assert not any(line.startswith("FORGED") for line in hostile_server.log().splitlines())


def test_the_log_formatter_escapes_every_control_character():
    formatter = dynimg.OneLineFormatter("%(message)s")
    record = dynimg.logging.LogRecord("dynimg", 20, __file__, 1, "GET %s",
                                      ("a\nb\rc\x1bd\u2028e",), None)
    assert formatter.format(record) == "GET a\\nb\\rc\\x1bd\\u2028e"


# --- 10. remote addresses: globally reachable only --------------------------------------------


@pytest.mark.parametrize("address, allowed", [
    ("8.8.8.8", True), ("2001:4860:4860::8888", True),
    ("100.100.100.200", False), ("fec0::1", False), ("10.0.0.1", False), ("127.0.0.1", False),
    ("169.254.169.254", False), ("::ffff:127.0.0.1", False), ("::ffff:8.8.8.8", True),
    ("64:ff9b::7f00:1", False), ("2002:7f00:1::1", False), ("fe80::1%eth0", False),
    ("::a00:1", False), ("::ffff:0:a00:1", False), ("::1", False),
    ("224.0.0.1", False), ("ff0e::1", False), ("192.0.2.1", False), ("0.0.0.0", False),
])
def test_only_globally_reachable_addresses_are_fetched(address, allowed):
    assert dynimg.is_public_address(address) is allowed


# --- 11. PNG within the budget; a render's search stops at its deadline ----------------------


def test_png_for_a_slow_client_fits_its_budget_over_http(hostile_server):
    reply = hostile_server.get("/images/photo-large-1.jpg?width=4000&height=4000&format=png"
                               "&bandwidth=2g")
    assert reply.status == 200 and reply.headers["Content-Type"] == "image/png"
    assert len(reply.body) <= 16000
    assert reply.image().format == "PNG"


def test_the_budget_search_stops_at_the_render_deadline(config, corpus, monkeypatch):
    with Image.open(os.path.join(corpus, "photo-large-2.jpg")) as photo:
        photo.draft("RGB", (1200, 1200))
        image = photo.convert("RGB")
    spec = dynimg.parse_spec(dynimg.Request(path="/x.jpg", query="format=png&bandwidth=2g"),
                             config)
    plan = dynimg.plan_output(dynimg.Facts(image.size, False), spec, config)
    encodes = []
    save = dynimg._save
    monkeypatch.setattr(dynimg, "_save", lambda *args: encodes.append(1) or save(*args))
    monkeypatch.setattr(dynimg.log, "disabled", True)
    facts = dynimg.Facts(image.size, False)
    late = dynimg.Job(spec, facts, plan, dynimg.LRU(1), deadline=time.monotonic() - 1)
    data, _, _ = dynimg.encode(image.copy(), late, None)
    assert len(encodes) == 2 and len(data) > spec.max_bytes  # first try and palette only
    encodes.clear()
    in_time = dynimg.Job(spec, facts, plan, dynimg.LRU(1), deadline=time.monotonic() + 60)
    data, _, _ = dynimg.encode(image.copy(), in_time, None)
    assert len(encodes) > 2 and len(data) <= spec.max_bytes


def test_grey_with_transparency_as_png_fits_a_budget(hostile_app, hostile_root, corpus):
    with Image.open(os.path.join(corpus, "grayscale.jpg")) as photo:
        photo.save(os.path.join(hostile_root, "hostile", "grey-trns.png"), transparency=0)
    app = hostile_app()
    for query in ("format=png&bandwidth=2g", "format=auto&bandwidth=2g"):
        reply = app.request("/hostile/grey-trns.png", query)
        assert reply.status == 200 and len(reply.body) <= 16000
        assert reply.image().format == "PNG"


def test_a_multi_picture_jpeg_is_not_called_animated(hostile_app, hostile_root, corpus):
    with Image.open(os.path.join(corpus, "photo-medium-1.jpg")) as photo, \
            Image.open(os.path.join(corpus, "photo-medium-2.jpg")) as depth:
        photo.save(os.path.join(hostile_root, "hostile", "two.jpg"), "MPO", save_all=True,
                   append_images=[depth.resize(photo.size)])
    reply = hostile_app().request("/hostile/two.jpg", "width=120")
    assert reply.status == 200 and "X-Image-Frames" not in reply.headers


def test_a_path_that_is_not_utf8_is_one_escaped_line_in_the_log_file(hostile_app, tmp_path):
    log_file = tmp_path / "dynimg.log"
    app = hostile_app(server={"log_file": str(log_file)})
    dynimg.configure_logging(app.config)  # the autouse fixture puts the logger back
    assert app.request_raw("/\xff\n.jpg", "width=1").status == 400
    for handler in dynimg.log.handlers:
        handler.flush()
    lines = [line for line in log_file.read_text().splitlines() if "GET" in line]
    assert len(lines) == 1 and "\\udcff\\n.jpg" in lines[0]


# --- 12. damaged cache entries and ICC transforms -----------------------------------------------


def test_a_cache_entry_with_a_damaged_middle_is_rendered_again(app):
    first = app.request("/photo-medium-1.jpg", "width=240")
    entry, file = app.dynimg.cache.lookup(first.headers["X-Image-Key"])
    path = file.name
    file.close()
    with open(path, "r+b") as damaged:
        damaged.seek(entry.length // 3)
        damaged.write(b"\0" * (entry.length // 3))
    assert os.path.getsize(path) == entry.length
    again = app.request("/photo-medium-1.jpg", "width=240")
    assert "cache;desc=hit" not in again.headers["Server-Timing"]
    assert again.body == first.body and app.dynimg.cache.counts["damaged"] == 1
    assert app.request("/photo-medium-1.jpg", "width=240").headers["Server-Timing"] \
        == dynimg.CACHE_HIT_TIMING


def test_icc_transforms_are_kept_in_a_bounded_lru(hostile_app, hostile_root, corpus):
    with Image.open(os.path.join(corpus, "icc-adobergb.jpg")) as photo:
        profile = bytearray(photo.info["icc_profile"])
        small = photo.resize((64, 34))
    folder = os.path.join(hostile_root, "profiles")
    os.makedirs(folder, exist_ok=True)
    for number in range(dynimg.TRANSFORM_CACHE_SIZE + 20):
        profile[24:36] = number.to_bytes(12, "big")  # the creation date: a new profile
        small.save(os.path.join(folder, f"{number}.jpg"), icc_profile=bytes(profile))
    app = hostile_app()
    for number in range(dynimg.TRANSFORM_CACHE_SIZE + 20):
        assert app.request(f"/profiles/{number}.jpg", "width=32").status == 200
    assert len(app.dynimg.transforms) == dynimg.TRANSFORM_CACHE_SIZE
    ImageCms.ImageCmsProfile(io.BytesIO(bytes(profile)))  # the last one was a usable profile


# --- 13. /_health shows no paths unless asked ----------------------------------------------------


def test_health_shows_status_and_version_only_by_default(hostile_app):
    health = json.loads(hostile_app().request("/_health").body)
    assert health == {"status": "ok", "version": dynimg.VERSION,
                      "avif": dynimg.AVIF_ENCODER is not None}
    detailed = json.loads(hostile_app(server={"health_details": "yes"}).request("/_health").body)
    assert detailed["image_root"] and detailed["pillow"]["version"] and "cache" in detailed


# --- 14. the demo takes names as image URLs do ------------------------------------------------


def test_the_demo_takes_a_name_with_a_space(hostile_app):
    app = hostile_app()
    assert app.request("/hostile/my photo.jpg", "width=100").status == 200
    demo = app.request("/_demo", "name=hostile%2Fmy%20photo.jpg&width=100")
    assert demo.status == 200
    assert "/images/hostile/my%20photo.jpg?bandwidth=2g" in demo.text


# --- slow readers -----------------------------------------------------------------------------


def test_slow_readers_free_their_threads_within_the_response_timeout(hostile_server):
    """32 clients, as many as the daemons' threads, each asking for a 14 MB answer
    (one cached PNG under 32 URLs, as q changes nothing for a PNG) and reading a byte
    a second: a cached image is answered once their responses time out."""
    big = "/images/photo-large-1.jpg?format=png&width=4000"
    assert hostile_server.get(big, timeout=120).status == 200
    probe = "/images/photo-medium-1.jpg?width=99"
    assert hostile_server.get(probe).status == 200
    clients, stop = [], threading.Event()
    try:
        for number in range(32):
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.connect(("127.0.0.1", hostile_server.port))
            client.sendall(f"GET {big}&q={number + 1} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            clients.append(client)

        def trickle():
            deadline = time.monotonic() + 60
            while not stop.wait(1) and time.monotonic() < deadline:
                for client in clients:
                    try:
                        client.recv(1)
                    except OSError:
                        pass
        reader = threading.Thread(target=trickle, daemon=True)
        reader.start()
        time.sleep(1)  # the 32 requests are in the daemons by now
        started = time.monotonic()
        reply = hostile_server.get(probe, timeout=conftest.RESPONSE_TIMEOUT + 20)
        waited = time.monotonic() - started
    finally:
        stop.set()
        for client in clients:
            client.close()
    assert reply.status == 200 and waited < conftest.RESPONSE_TIMEOUT + 5


# --- the hostile mix --------------------------------------------------------------------------


def hostile_requests(origin, seconds):
    """(path, statuses it may get) for about `seconds` of attack, as varied as it comes."""
    number = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        number += 1
        yield from [
            (f"/images/hostile/strip.png?width=4000&height={3000 + number}&fit=cover&upscale=1",
             {200, 503}),
            (f"/images/photo-large-portrait.jpg?width={3000 + number}&upscale=1", {200, 503}),
            (f"/images/missing-{number}.jpg?width=4000&height={3900 + number % 100}&format=png",
             {404, 503}),
            (f"/images/_demo?name=photo-large-3.jpg&width={3000 + number}", {200, 503}),
            (remote_query(origin, "/trickle-body", f"width={number}"), {504, 503}),
            ("/images/hostile/declares-10000x10000.fits?width=4000", {422, 503}),
        ]


def test_a_hostile_mix_kills_no_daemon_and_never_stalls_a_cached_image(hostile_server, origin):
    port = hostile_server.port
    cached = "/images/photo-medium-2.jpg?width=320"
    assert hostile_server.get(cached).status == 200
    daemons = daemon_pids(port)
    assert len(daemons) == 2
    stop = threading.Event()
    hit_seconds = []

    def probe():
        while not stop.is_set():
            started = time.monotonic()
            reply = hostile_server.get(cached, timeout=30)
            hit_seconds.append(time.monotonic() - started)
            assert reply.status == 200
            stop.wait(0.2)

    def attack(requests):
        answers = []
        for path, statuses in requests:
            answers.append((path, hostile_server.get(path, timeout=60).status, statuses))
        return answers

    requests = hostile_requests(origin, seconds=20)
    lock = threading.Lock()

    def next_requests():
        while True:
            with lock:
                item = next(requests, None)
            if item is None:
                return
            yield item

    with concurrent.futures.ThreadPoolExecutor(13) as pool:
        prober = pool.submit(probe)
        try:
            attackers = [pool.submit(attack, next_requests()) for _ in range(12)]
            answers = [answer for attacker in attackers for answer in attacker.result()]
        finally:
            stop.set()  # the probe ends even if an attacker failed
        prober.result()
    assert [(path, status) for path, status, statuses in answers if status not in statuses] == []
    assert daemon_pids(port) == daemons  # none killed, none replaced
    peaks = [peak_rss_mb(pid) for pid in daemons]
    print(f"hostile mix: {len(answers)} requests, statuses "
          f"{sorted(collections.Counter(status for _, status, _ in answers).items())}, "
          f"peak RSS {peaks} MB, slowest cached answer {max(hit_seconds):.2f} s "
          f"of {len(hit_seconds)}")
    assert max(peaks) < RSS_BOUND_MB
    assert max(hit_seconds) < HIT_BOUND_SECONDS
