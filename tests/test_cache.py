"""Image keys, conditional requests and the result cache on disk."""

import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import time
import zlib

import pytest

import dynimg
from conftest import PROJECT, App, write_config


@pytest.fixture
def cached_app(image_root, tmp_path):
    """The app with a result cache of its own, empty at the start (and /_health
    details on, to read the cache's figures)."""
    config = dynimg.load_config(write_config(str(tmp_path), image_root,
                                             server={"health_details": "yes"}))
    return App(config), config


def disk_bytes(paths):
    return sum(os.stat(path).st_blocks * 512 for path in paths)


def cache_files(config):
    """Every file in the cache but its locks and its figures (for /_health)."""
    return [os.path.join(folder, name) for folder, _, names in os.walk(config.cache_dir)
            for name in names if ".locks" not in folder and name != dynimg.FIGURES_FILE]


def test_a_repeated_request_is_a_cache_hit_with_the_same_bytes_and_headers(cached_app):
    app, config = cached_app
    first = app.request("/photo-medium-2.jpg", "width=300")
    second = app.request("/photo-medium-2.jpg", "width=300")
    assert "decode" in first.headers["Server-Timing"]
    assert second.headers["Server-Timing"] == "cache;desc=hit"
    assert second.body == first.body
    for header in ("ETag", "X-Image-Key", "Content-Type", "Content-Length", "Last-Modified",
                   "X-Image-Size", "X-Image-Quality", "Cache-Control", "Vary"):
        assert second.headers[header] == first.headers[header], header
    key = first.headers["X-Image-Key"]
    [path] = cache_files(config)
    assert path.startswith(os.path.join(config.cache_dir, key[:2], key[2:4], key + "."))
    # KEY.SOURCE.WxH.qQ.FRAMES.LENGTH.CRC.FORMAT: all a response needs, and a checksum
    entry = dynimg.CacheEntry.parse(os.path.basename(path))
    assert entry.name == os.path.basename(path)
    assert (entry.key, entry.format) == (key, "jpeg")
    assert f"{entry.width}x{entry.height}" == first.headers["X-Image-Size"]
    assert entry.quality == int(first.headers["X-Image-Quality"])
    assert entry.length == len(first.body) and entry.crc == zlib.crc32(first.body)
    assert entry.source == dynimg.source_tag("photo-medium-2.jpg")
    # the app counts each request once; a lookup of its own counts nothing
    cache = app.dynimg.cache
    assert (cache.counts["misses"], cache.counts["hits"]) == (1, 1)
    hit = cache.lookup(key)
    hit[1].close()
    assert (cache.counts["misses"], cache.counts["hits"]) == (1, 1)


def test_head_on_a_hit_agrees_with_get(cached_app):
    app, _ = cached_app
    get = app.request("/photo-medium-2.jpg", "width=310")
    head = app.request("/photo-medium-2.jpg", "width=310", method="HEAD")
    assert head.headers["Server-Timing"] == "cache;desc=hit"
    assert head.body == b"" and head.headers["Content-Length"] == str(len(get.body))


def test_a_changed_source_gets_a_new_key_and_never_the_stale_entry(cached_app, image_root):
    app, _ = cached_app
    path = os.path.join(image_root, "changing.jpg")
    shutil.copy(os.path.join(image_root, "photo-medium-1.jpg"), path)
    before = app.request("/changing.jpg", "width=200")
    shutil.copy(os.path.join(image_root, "photo-medium-2.jpg"), path)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000_000))
    after = app.request("/changing.jpg", "width=200")
    assert after.headers["X-Image-Key"] != before.headers["X-Image-Key"]
    assert "decode" in after.headers["Server-Timing"]
    assert after.image().size == (200, 125)  # the new photo's shape, not the old one's


@pytest.mark.parametrize("damage", ["truncate", "flip-end", "flip-middle", "garbage-name"])
def test_a_damaged_cache_file_is_never_served(cached_app, damage):
    app, config = cached_app
    first = app.request("/photo-medium-2.jpg", "width=320")
    [path] = cache_files(config)
    if damage == "truncate":
        with open(path, "r+b") as file:
            file.truncate(os.path.getsize(path) // 2)
    elif damage == "flip-end":
        with open(path, "r+b") as file:
            file.seek(-2, os.SEEK_END)
            file.write(b"\x00\x00")
    elif damage == "flip-middle":  # same length: only the checksum tells
        with open(path, "r+b") as file:
            file.seek(os.path.getsize(path) // 2)
            byte = file.read(1)
            file.seek(-1, os.SEEK_CUR)
            file.write(bytes([byte[0] ^ 0xFF]))
    else:
        os.rename(path, path.replace(".jpeg", ".bogus"))
    again = app.request("/photo-medium-2.jpg", "width=320")
    assert "decode" in again.headers["Server-Timing"]
    assert again.image().size == (320, 200)
    assert app.request("/photo-medium-2.jpg", "width=320").body == first.body
    if damage != "garbage-name":  # a name that is no entry is not even looked at
        assert app.dynimg.cache.counts["damaged"] == 1


def test_temporary_files_of_a_killed_writer_are_not_served_and_are_pruned(cached_app):
    app, config = cached_app
    key_reply = app.request("/photo-medium-2.jpg", "width=330")
    key = key_reply.headers["X-Image-Key"]
    folder = os.path.join(config.cache_dir, key[:2], key[2:4])
    for path in cache_files(config):
        os.unlink(path)
    partial = os.path.join(folder, ".tmp-killed")
    with open(partial, "wb") as file:
        file.write(key_reply.body[:100])
    os.utime(partial, (time.time() - 7200, time.time() - 7200))
    assert "decode" in app.request("/photo-medium-2.jpg", "width=330").headers["Server-Timing"]
    app.dynimg.cache.prune()
    assert not os.path.exists(partial)


def test_one_render_per_key_when_many_threads_ask_at_once(cached_app, monkeypatch):
    app, config = cached_app
    renders = []
    original = dynimg.render_opened

    def counting(*args, **kwargs):
        renders.append(1)
        time.sleep(0.3)  # hold the lock long enough for the others to queue
        return original(*args, **kwargs)

    monkeypatch.setattr(dynimg, "render_opened", counting)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: app.request("/photo-large-3.jpg", "width=240"),
                                range(8)))
    assert len(renders) == 1
    assert len({reply.body for reply in replies}) == 1
    assert sum(r.headers["Server-Timing"] == "cache;desc=hit" for r in replies) == 7


def test_an_empty_cache_dir_turns_the_cache_off(image_root, tmp_path):
    config = dynimg.load_config(write_config(str(tmp_path), image_root, cache={"cache_dir": ""}))
    app = App(config)
    assert app.dynimg.cache is None
    app.request("/photo-medium-1.jpg", "width=100")
    again = app.request("/photo-medium-1.jpg", "width=100")
    assert again.status == 200 and "decode" in again.headers["Server-Timing"]


def test_an_unwritable_cache_serves_uncached_with_a_log_line(image_root, tmp_path, monkeypatch,
                                                             caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_bytes(b"")
    config = dynimg.load_config(write_config(str(tmp_path), image_root,
                                             cache={"cache_dir": str(blocker)}))
    app = App(config)
    with caplog.at_level("WARNING", logger="dynimg"):
        monkeypatch.setattr(dynimg.log, "propagate", True)
        reply = app.request("/photo-medium-1.jpg", "width=90")
    assert reply.status == 200 and reply.image().width == 90
    assert "result cache write failed" in caplog.text


def test_pruning_keeps_the_bound_and_the_recently_used(cached_app, monkeypatch):
    app, config = cached_app
    widths = range(600, 1400, 100)
    for width in widths:
        app.request("/photo-large-1.jpg", f"width={width}")
    on_disk = disk_bytes(cache_files(config))
    recent = app.request("/photo-large-1.jpg", "width=600")  # a hit: now the most recent
    assert recent.headers["Server-Timing"] == "cache;desc=hit"
    cache = app.dynimg.cache
    old = time.time() - 10000
    for path in cache_files(config):
        if "600x" not in path:
            os.utime(path, (old, old))
    bound = on_disk // 2
    monkeypatch.setattr(cache, "max_bytes", bound)
    assert cache.prune() > 0
    left = cache_files(config)
    assert disk_bytes(left) <= bound * dynimg.PRUNE_TO
    assert any(".600x" in path for path in left)


def test_the_bound_counts_disk_blocks_not_lengths(cached_app, monkeypatch):
    """Small answers take a whole block each: their lengths would undercount."""
    app, config = cached_app
    for width in range(10, 20):
        app.request("/photo-medium-1.jpg", f"width={width}&format=png")
    paths = cache_files(config)
    lengths = sum(os.path.getsize(path) for path in paths)
    blocks = disk_bytes(paths)
    assert len(paths) == 10 and blocks >= 10 * 4096 > lengths * 2
    cache = app.dynimg.cache
    assert cache.stats()["bytes"] == blocks and cache.stats()["entries"] == 10
    # a bound the lengths fit in twice over still trims, by blocks
    monkeypatch.setattr(cache, "max_bytes", lengths * 2)
    assert cache.prune() > 0
    left = cache_files(config)
    assert disk_bytes(left) <= lengths * 2 * dynimg.PRUNE_TO


def test_removing_a_file_being_served_does_not_cut_the_response(cached_app):
    app, config = cached_app
    first = app.request("/photo-medium-2.jpg", "width=340")
    entry, file = app.dynimg.cache.lookup(first.headers["X-Image-Key"])
    for path in cache_files(config):
        os.unlink(path)
    with file:
        assert file.read() == first.body


@pytest.mark.parametrize("headers, status", [
    ({"If-Modified-Since": "Fri, 01 Jan 2100 00:00:00 GMT"}, 304),
    ({"If-Modified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"}, 200),
    ({"If-Modified-Since": "yesterday"}, 200),
    ({"If-None-Match": '"nope"', "If-Modified-Since": "Fri, 01 Jan 2100 00:00:00 GMT"}, 200),
    ({"If-None-Match": "*"}, 304),
])
def test_conditional_requests(cached_app, headers, status):
    app, _ = cached_app
    reply = app.request("/photo-medium-1.jpg", "width=120", headers=headers)
    assert reply.status == status
    if status == 304:
        assert reply.body == b"" and reply.headers["ETag"].startswith('"')
        assert "Last-Modified" in reply.headers


def test_cache_control_carries_the_stale_windows_and_errors_the_short_age(cached_app):
    app, config = cached_app
    image = app.request("/photo-medium-1.jpg", "width=120")
    assert image.headers["Cache-Control"] == (
        f"public, max-age={config.cache_max_age}, s-maxage={config.shared_max_age}, "
        f"stale-while-revalidate="
        f"{config.stale_while_revalidate}, stale-if-error={config.stale_if_error}")
    for reply in (app.request("/missing.jpg"), app.request("/not-image.jpg"),
                  app.request("/photo-medium-1.jpg", "width=x")):
        assert reply.headers["Cache-Control"] == f"public, max-age={config.error_max_age}"


def test_health_shows_cache_size_entries_and_hit_ratio(cached_app):
    app, config = cached_app
    app.request("/photo-medium-1.jpg", "width=130")
    app.request("/photo-medium-1.jpg", "width=130")
    cache = json.loads(app.request("/_health").body)["cache"]
    assert cache["hits"] == 1 and cache["misses"] == 1 and cache["hit_ratio"] == 0.5
    assert cache["damaged"] == 0 and cache["max_bytes"] == config.cache_max_mb * 1024 * 1024
    # sizes come from the last trim (/_health never walks the disk): none yet
    assert cache["entries_at_last_trim"] is None and cache["bytes_at_last_trim"] is None
    app.dynimg.cache.prune()
    cache = json.loads(app.request("/_health").body)["cache"]
    assert cache["entries_at_last_trim"] == 1
    assert cache["bytes_at_last_trim"] == disk_bytes(cache_files(config))
    assert cache["last_trim"] <= time.time()


def test_health_hides_the_cache_without_details(app):
    app.request("/photo-medium-1.jpg", "width=130")
    assert "cache" not in json.loads(app.request("/_health").body)


def test_cache_command_stats_purge_and_prune(cached_app, image_root):
    app, config = cached_app
    for width in (100, 110, 120):
        app.request("/photo-medium-1.jpg", f"width={width}")
    app.request("/photo-medium-2.jpg", "width=100")

    def run(*words):
        result = subprocess.run([sys.executable, os.path.join(PROJECT, "dynimg.py"),
                                 "--config", config.path, "cache", *words],
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert "4 entries" in run("stats")
    assert "removed 3 cached variants" in run("purge", "photo-medium-1.jpg")
    assert "1 entries" in run("prune")
    assert "decode" in app.request("/photo-medium-1.jpg", "width=100").headers["Server-Timing"]
    assert app.request("/photo-medium-2.jpg", "width=100").headers["Server-Timing"] \
        == "cache;desc=hit"


def test_cached_files_go_out_through_wsgi_file_wrapper(cached_app):
    app, _ = cached_app
    app.request("/photo-medium-1.jpg", "width=140")
    wrapped = []
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/photo-medium-1.jpg",
               "QUERY_STRING": "width=140",
               "wsgi.file_wrapper": lambda file, size: wrapped.append(file) or [file.read()]}
    body = app.dynimg(environ, lambda status, headers: None)
    assert wrapped and body[0][:2] == b"\xff\xd8"
    wrapped[0].close()
