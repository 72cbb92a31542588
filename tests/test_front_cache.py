"""Apache's own cache in front of dynimg (the shipped apache/cache.conf), for real:
mod_wsgi-express with the file included, on 127.0.0.1."""

import os
import re
import shutil
import signal
import subprocess
import time

import pytest

from conftest import PROJECT, ModWsgiExpress, shared_tempdir, write_config

#: Seconds shared caches keep a response before asking dynimg again (short, for the test).
FRESH = 2


def get_and_store(server, path, **kwargs):
    """A first request; Apache files its copy just after the client has the last
    byte, so a repeat sent at once may still go to dynimg: give it a moment."""
    reply = server.get(path, **kwargs)
    time.sleep(0.3)
    return reply


@pytest.fixture(scope="module")
def front(image_root):
    folder = shared_tempdir("dynimg-front-")
    config = write_config(folder, image_root, server={
        "log_level": "INFO", "shared_max_age": FRESH, "error_max_age": FRESH})
    server = ModWsgiExpress(config, front_cache=True)
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


def app_requests(server, path):
    """How many requests for `path` reached dynimg itself (it logs one line each)."""
    marker = f" {path[len('/images'):]} "
    return sum(1 for line in server.log().splitlines() if marker in line and " ms" in line)


def test_a_repeat_is_answered_by_apache_with_the_same_image_and_headers(front):
    path = "/images/photo-medium-1.jpg?width=301"
    first = get_and_store(front, path)
    second = front.get(path)
    assert first.status == second.status == 200
    assert first.headers["X-Cache"].startswith("MISS")
    assert second.headers["X-Cache"].startswith("HIT")
    assert second.body == first.body
    for header in ("ETag", "X-Image-Key", "Vary", "Content-Type", "Cache-Control",
                   "Last-Modified", "Accept-CH", "X-Image-Size", "X-Image-Network"):
        assert second.headers[header] == first.headers[header], header
    assert "Server-Timing" not in second.headers  # it described the render, not this answer
    assert app_requests(front, path) == 1


def test_each_client_hint_variant_is_cached_apart(front):
    path = "/images/photo-medium-1.jpg?width=700"
    default = get_and_store(front, path)
    slow = get_and_store(front, path, headers={"ECT": "2g"})
    assert slow.headers["X-Cache"].startswith("MISS")  # not the default variant
    assert slow.headers["X-Image-Network"] == "2g"
    assert len(slow.body) < len(default.body)
    again_slow = front.get(path, headers={"ECT": "2g"})
    again_default = front.get(path)
    assert again_slow.headers["X-Cache"].startswith("HIT")
    assert again_slow.body == slow.body
    assert again_default.headers["X-Cache"].startswith("HIT")
    assert again_default.body == default.body


def test_format_auto_is_cached_per_accept_header(front):
    path = "/images/photo-medium-1.jpg?width=201&format=auto"
    webp = get_and_store(front, path, headers={"Accept": "image/webp,*/*"})
    jpeg = get_and_store(front, path, headers={"Accept": "image/png,*/*"})
    assert webp.headers["Content-Type"] == "image/webp"
    assert jpeg.headers["Content-Type"] == "image/jpeg"
    assert front.get(path, headers={"Accept": "image/png,*/*"}).body == jpeg.body


def test_revalidation_by_the_client_is_a_304_from_the_cache(front):
    path = "/images/photo-medium-1.jpg?width=321"
    etag = get_and_store(front, path).headers["ETag"]
    reply = front.get(path, headers={"If-None-Match": etag})
    assert reply.status == 304
    assert reply.body == b""
    assert app_requests(front, path) == 1


def test_a_client_no_cache_does_not_reach_dynimg(front):
    path = "/images/photo-medium-1.jpg?width=331"
    get_and_store(front, path)
    reply = front.get(path, headers={"Cache-Control": "no-cache", "Pragma": "no-cache"})
    assert reply.headers["X-Cache"].startswith("HIT")
    assert app_requests(front, path) == 1


def test_a_replaced_source_is_served_within_the_fresh_seconds(front, image_root, corpus):
    name = "front-replaced.jpg"
    target = os.path.join(image_root, name)
    shutil.copy(os.path.join(corpus, "photo-medium-1.jpg"), target)
    os.chmod(target, 0o644)
    path = f"/images/{name}?width=300"
    before = get_and_store(front, path)
    assert front.get(path).headers["X-Cache"].startswith("HIT")
    time.sleep(FRESH + 1)
    unchanged = get_and_store(front, path)  # stale: Apache asks dynimg, which says 304
    assert unchanged.headers["X-Cache"].startswith("REVALIDATE")
    assert unchanged.body == before.body
    shutil.copy(os.path.join(corpus, "photo-medium-2.jpg"), target + ".new")
    os.chmod(target + ".new", 0o644)
    os.replace(target + ".new", target)
    time.sleep(FRESH + 1)
    after = get_and_store(front, path)
    assert after.status == 200
    assert after.headers["ETag"] != before.headers["ETag"]
    assert after.headers["X-Image-Size"] != before.headers["X-Image-Size"]
    assert front.get(path).body == after.body


def test_pages_are_never_served_from_the_cache(front):
    replies = [get_and_store(front, "/images/_health") for _ in range(3)]
    assert all(not reply.headers.get("X-Cache", "").startswith("HIT") for reply in replies)
    assert app_requests(front, "/images/_health?") >= 3


def test_a_source_that_appears_replaces_the_cached_404_within_error_max_age(
        front, image_root, corpus):
    name = "front-appears.jpg"
    path = f"/images/{name}?width=300"
    missing = get_and_store(front, path)
    assert missing.status == 404
    assert front.get(path).status == 404  # the 404 image may be cached: error_max_age
    shutil.copy(os.path.join(corpus, "photo-medium-1.jpg"), os.path.join(image_root, name))
    os.chmod(os.path.join(image_root, name), 0o644)
    time.sleep(FRESH + 1)
    appeared = front.get(path)
    assert appeared.status == 200
    assert appeared.headers["X-Image-Size"] == "300x200"


def test_apache_served_hits_keep_their_bodies_whole(front, image_root):
    """Every cached variant on Apache's disk is a whole image that decodes."""
    from PIL import Image
    import io
    paths = [f"/images/photo-medium-1.jpg?width={width}" for width in (111, 222, 333)]
    firsts = [get_and_store(front, path).body for path in paths]
    for path, first in zip(paths, firsts):
        reply = front.get(path)
        assert reply.headers["X-Cache"].startswith("HIT")
        assert reply.body == first
        Image.open(io.BytesIO(reply.body)).load()
    stored = [os.path.join(folder, name) for folder, _, names in os.walk(front.cache_root)
              for name in names if name.endswith(".data")]
    assert len(stored) >= 3


def makefile_htcacheclean_minutes():
    """The interval `make serve` runs htcacheclean with (its -d, in minutes)."""
    with open(os.path.join(PROJECT, "Makefile")) as makefile:
        return int(re.search(r"htcacheclean -d(\d+) ", makefile.read())[1])


def cache_bytes(folder):
    return sum(os.path.getsize(os.path.join(path, name))
               for path, _, names in os.walk(folder) for name in names)


def test_the_front_cache_is_back_within_its_bound_within_a_minute(image_root):
    """htcacheclean as `make serve` runs it, on a server filling its cache past the bound."""
    folder = shared_tempdir("dynimg-trim-")
    pid_file = os.path.join(folder, "htcacheclean.pid")
    server = None
    try:
        server = ModWsgiExpress(write_config(folder, image_root), front_cache=True)
        limit = 300 * 1024
        # it forks into the background at once, writing its pid, then trims
        subprocess.run(["htcacheclean", f"-d{makefile_htcacheclean_minutes()}", "-n", "-t",
                        "-p", server.cache_root, "-l", f"{limit}B", "-P", pid_file], check=True)
        deadline = time.monotonic() + 10
        while not os.path.exists(pid_file) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1)  # its first run, on the empty cache, is over: the next is a minute on
        for width in range(600, 640):
            assert server.get(f"/images/photo-medium-1.jpg?width={width}").status == 200
        filled = cache_bytes(server.cache_root)
        assert filled > 2 * limit
        started = time.monotonic()
        while cache_bytes(server.cache_root) > limit and time.monotonic() - started < 75:
            time.sleep(1)
        trimmed = cache_bytes(server.cache_root)
        print(f"\nfront cache: {filled} bytes, {trimmed} bytes "
              f"{time.monotonic() - started:.0f} s later (bound {limit})")
        assert trimmed <= limit
    finally:
        if os.path.exists(pid_file):
            with open(pid_file) as pid:
                os.kill(int(pid.read()), signal.SIGTERM)
        if server:
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)
