"""Masters: a large source decoded once, kept in the result cache beside its answers,
and its later variants made from it (real photos; one test on a real server)."""

import concurrent.futures
import http.server
import io
import os
import shutil
import threading
import time
import urllib.parse

import numpy
import pytest
from PIL import Image

import dynimg
from conftest import App, ModWsgiExpress, corpus_dir, shared_tempdir, write_config

PROGRESSIVE = "photo-large-2.jpg"  # 12 Mpx progressive: worth a master
BASELINE = "photo-phone.jpg"  # 8 Mpx baseline: decodes fast, gets none


def timing(reply):
    return reply.headers["Server-Timing"]


def master_files(config):
    found = []
    for path, entry, _ in dynimg.ResultCache(config).entries():
        if entry and entry.format == "jpeg":
            with Image.open(path) as image:
                if dynimg.MASTER_COMMENT.fullmatch(image.info.get("comment") or b""):
                    found.append(path)
    return found


@pytest.fixture
def images():
    """An image root of its own, so sources can be changed."""
    root = shared_tempdir("dynimg-masters-")
    corpus = corpus_dir()
    for name in (PROGRESSIVE, BASELINE, "photo-large-1.jpg", "photo-large-portrait.jpg",
                 "exif-orient-6.jpg", "exif-orient-3.jpg", "webp-lossy.webp"):
        shutil.copy(os.path.join(corpus, name), root)
        os.chmod(os.path.join(root, name), 0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def make_app(images, folder, **sections):
    config = dynimg.load_config(write_config(folder, images, **sections))
    return App(config), config


def pixels(reply):
    return numpy.asarray(reply.image().convert("RGB"), dtype=float)


def test_a_master_is_made_once_and_later_variants_come_from_it(images, tmp_path):
    app, config = make_app(images, str(tmp_path))
    first = app.request("/" + PROGRESSIVE, "width=400")
    assert "master;desc=made" in timing(first)
    for width in (640, 1080, 2048):
        assert "master;desc=kept" in timing(app.request("/" + PROGRESSIVE, f"width={width}"))
    # wider than the master: from the source
    assert "master" not in timing(app.request("/" + PROGRESSIVE, "width=2400"))
    assert len(master_files(config)) == 1
    # a fast baseline source, and a source too small, get none
    assert "master" not in timing(app.request("/" + BASELINE, "width=400"))
    assert "master" not in timing(app.request("/exif-orient-6.jpg", "width=400"))
    assert len(master_files(config)) == 1


@pytest.mark.parametrize("name", [PROGRESSIVE, "photo-large-1.jpg", "photo-large-portrait.jpg"])
@pytest.mark.parametrize("query", ["width=360", "width=800&format=webp",
                                   "width=600&height=600&fit=cover&gravity=north",
                                   "width=1000&bandwidth=3g", "width=500&height=500&fit=pad"])
def test_answers_from_the_master_match_answers_from_the_source(images, tmp_path, name, query):
    cached, _ = make_app(images, str(tmp_path / "cached"))
    direct, _ = make_app(images, str(tmp_path / "direct"), cache={"cache_dir": ""})
    cached.request("/" + name, "width=300")  # makes the master
    from_master = cached.request("/" + name, query)
    from_source = direct.request("/" + name, query)
    assert "master;desc=kept" in timing(from_master)
    assert "master" not in timing(from_source)
    for header in ("X-Image-Size", "X-Image-Key", "Content-Type"):
        assert from_master.headers[header] == from_source.headers[header]
    difference = numpy.abs(pixels(from_master) - pixels(from_source))
    assert difference.mean() < 1.5, difference.mean()


@pytest.mark.parametrize("name", ["exif-orient-6.jpg", "exif-orient-3.jpg"])
def test_masters_of_rotated_sources_are_upright(images, tmp_path, monkeypatch, name):
    monkeypatch.setattr(dynimg, "MASTER_MIN_PIXELS", 1)
    monkeypatch.setattr(dynimg, "MASTER_MIN_BASELINE_PIXELS", 1)
    monkeypatch.setattr(dynimg, "MASTER_SIDE", 1000)
    cached, _ = make_app(images, str(tmp_path / "cached"))
    direct, _ = make_app(images, str(tmp_path / "direct"), cache={"cache_dir": ""})
    assert "master;desc=made" in timing(cached.request("/" + name, "width=200"))
    from_master = cached.request("/" + name, "width=450&height=300&fit=cover")
    assert "master;desc=kept" in timing(from_master)
    from_source = direct.request("/" + name, "width=450&height=300&fit=cover")
    assert from_master.headers["X-Image-Size"] == "450x300"
    # close (the direct answer is DCT-scaled to 1/4, the master's answer is not), and
    # much closer than either turned the other way round
    assert numpy.abs(pixels(from_master) - pixels(from_source)).mean() < 4
    turned = pixels(from_source)[::-1, ::-1]
    assert numpy.abs(pixels(from_master) - turned).mean() > 20


def test_a_master_plans_as_its_source_would_where_the_decode_decides(
        images, tmp_path, monkeypatch):
    """A negotiated AVIF gives way where the source's decode (a WebP's: 19 bytes a
    pixel) and AVIF's encoder would pass max_render_mb; the master, a JPEG that decodes
    in 6, carries its source's figure, so its answer's format and key are the same."""
    monkeypatch.setattr(dynimg, "MASTER_MIN_PIXELS", 1)
    monkeypatch.setattr(dynimg, "MASTER_SIDE", 800)
    limits = {"max_render_mb": "27"}  # 29 MiB as WebP source and AVIF, 24 if judged as 12
    cached, _ = make_app(images, str(tmp_path / "cached"), limits=limits)
    direct, _ = make_app(images, str(tmp_path / "direct"), limits=limits,
                         cache={"cache_dir": ""})
    assert "master;desc=made" in timing(cached.request("/webp-lossy.webp", "width=300"))
    query, accept = "width=700&format=auto", {"Accept": "image/avif,image/webp,*/*"}
    from_master = cached.request("/webp-lossy.webp", query, headers=accept)
    from_source = direct.request("/webp-lossy.webp", query, headers=accept)
    assert "master;desc=kept" in timing(from_master)
    assert from_source.headers["Content-Type"] == "image/webp"
    for header in ("X-Image-Size", "X-Image-Key", "Content-Type"):
        assert from_master.headers[header] == from_source.headers[header]


def test_a_changed_source_never_renders_from_the_old_master(images, tmp_path):
    app, config = make_app(images, str(tmp_path))
    path = os.path.join(images, PROGRESSIVE)
    before = app.request("/" + PROGRESSIVE, "width=400")
    assert "master;desc=made" in timing(before)
    replacement = os.path.join(images, "photo-large-portrait.jpg")
    shutil.copy(replacement, path + ".new")
    os.replace(path + ".new", path)
    after = app.request("/" + PROGRESSIVE, "width=400")
    assert "master;desc=made" in timing(after)
    assert after.headers["X-Image-Size"] == "400x600"  # the portrait's shape
    assert after.headers["X-Image-Key"] != before.headers["X-Image-Key"]
    assert len(master_files(config)) == 2


@pytest.mark.parametrize("damage", ["cut", "flipped", "not a master"])
def test_a_damaged_master_is_discarded_and_made_again(images, tmp_path, damage):
    app, config = make_app(images, str(tmp_path))
    app.request("/" + PROGRESSIVE, "width=400")
    [master] = master_files(config)
    data = open(master, "rb").read()
    if damage == "cut":
        data = data[:len(data) // 2]
    elif damage == "flipped":
        data = data[:5000] + bytes([data[5000] ^ 0xFF]) + data[5001:]
    else:  # sound on disk (length and checksum match its name), yet no master inside
        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), "red").save(buffer, "JPEG")
        data = buffer.getvalue()
        entry = dynimg.CacheEntry.parse(os.path.basename(master))
        os.remove(master)
        entry = dynimg.dataclasses.replace(entry, length=len(data),
                                           crc=dynimg.zlib.crc32(data))
        master = os.path.join(os.path.dirname(master), entry.name)
    with open(master, "wb") as file:
        file.write(data)
    again = app.request("/" + PROGRESSIVE, "width=640")
    assert again.status == 200 and "master;desc=made" in timing(again)
    if os.path.exists(master):  # made again under the same name: sound this time
        assert open(master, "rb").read() != data
    assert again.image().getpixel((10, 10)) != (254, 0, 0)
    assert len(master_files(config)) == 1


def test_purge_removes_the_master_and_the_bound_counts_it(images, tmp_path):
    app, config = make_app(images, str(tmp_path))
    app.request("/" + PROGRESSIVE, "width=400")
    app.request("/" + "photo-large-1.jpg", "width=400")
    cache = dynimg.ResultCache(config)
    masters = master_files(config)
    assert len(masters) == 2
    # the bound counts masters like answers: their blocks are in the total
    total = cache.stats()["bytes"]
    assert total >= sum(os.stat(path).st_blocks * 512 for path in masters)
    cache.max_bytes = total // 3  # less than either master
    os.utime(masters[0], (1, 1))  # the least recently used
    cache.prune()
    assert not os.path.exists(masters[0])
    assert cache.stats()["bytes"] <= cache.max_bytes
    # purge by name removes its master with its answers
    app.request("/" + PROGRESSIVE, "width=300")
    assert cache.purge(PROGRESSIVE) >= 2
    assert not [path for path in master_files(config)
                if dynimg.CacheEntry.parse(os.path.basename(path)).source
                == dynimg.source_tag(PROGRESSIVE)]


def test_concurrent_misses_of_one_source_make_one_master_across_processes(images):
    folder = shared_tempdir("dynimg-masters-server-")
    try:
        config_path = write_config(folder, images)
        server = ModWsgiExpress(config_path, processes=2, threads=8)
        try:
            widths = (320, 360, 400, 480, 540, 640, 720, 800)
            with concurrent.futures.ThreadPoolExecutor(len(widths)) as pool:
                replies = list(pool.map(
                    lambda width: server.get(f"/images/{PROGRESSIVE}?width={width}"), widths))
            assert [reply.status for reply in replies] == [200] * len(widths)
            made = [reply for reply in replies if "master;desc=made" in timing(reply)]
            kept = [reply for reply in replies if "master;desc=kept" in timing(reply)]
            assert len(made) == 1 and len(kept) == len(widths) - 1
            assert server.log().count("made a master of") == 1
            assert len({reply.headers["X-Image-Key"] for reply in replies}) == len(widths)
        finally:
            server.stop()
        assert len(master_files(dynimg.load_config(config_path))) == 1
    finally:
        shutil.rmtree(folder, ignore_errors=True)


class CountingOrigin(http.server.ThreadingHTTPServer):
    """A loopback origin serving one photo and counting the GETs it answers."""
    daemon_threads = True

    def __init__(self, photo):
        self.photo, self.fetches = photo, 0
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                origin.fetches += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(origin.photo)))
                self.end_headers()
                self.wfile.write(origin.photo)
        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture
def origin():
    with open(os.path.join(corpus_dir(), PROGRESSIVE), "rb") as file:
        server = CountingOrigin(file.read())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


def remote_app(images, folder, refetch_after):
    return make_app(images, folder, remote={
        "allowed_hosts": "127.0.0.1", "allowed_networks": "127.0.0.0/8",
        "refetch_after": str(refetch_after)})


def ask_remote(app, origin, query):
    url = urllib.parse.quote(f"http://127.0.0.1:{origin.server_address[1]}/photo.jpg", safe="")
    return app.request("/", f"url={url}&{query}")


def test_a_remote_source_is_fetched_once_for_the_variants_its_master_serves(
        images, tmp_path, origin):
    # a period that cannot end during the test
    app, config = remote_app(images, str(tmp_path), refetch_after=10 ** 9)
    first = ask_remote(app, origin, "width=400")
    assert first.status == 200 and "master;desc=made" in timing(first)
    assert origin.fetches == 1
    for query in ("width=640", "width=1080&format=webp", "width=800&bandwidth=3g",
                  "width=500&height=500&fit=cover"):
        reply = ask_remote(app, origin, query)
        assert reply.status == 200 and "master;desc=kept" in timing(reply), query
    assert origin.fetches == 1  # neither fetched nor decoded again
    # an answer wider than the master needs the source again
    wide = ask_remote(app, origin, "width=2400")
    assert wide.status == 200 and "master" not in timing(wide)
    assert origin.fetches == 2
    assert len(master_files(config)) == 1


def test_a_remote_source_is_fetched_again_and_mastered_again_in_a_new_period(
        images, tmp_path, origin):
    app, config = remote_app(images, str(tmp_path), refetch_after=1)
    first = ask_remote(app, origin, "width=400")
    assert "master;desc=made" in timing(first)
    period = int(time.time())  # the first's period, or a later one
    while int(time.time()) == period:  # the next refetch period, at most a second away
        time.sleep(0.05)
    again = ask_remote(app, origin, "width=640")
    assert again.status == 200 and "master;desc=made" in timing(again)
    assert origin.fetches == 2
    assert len(master_files(config)) == 2


@pytest.mark.parametrize("name", ["photo-large-portrait.jpg", "photo-large-1.jpg"])
def test_a_jpeg_decoded_at_a_reduced_scale_stays_in_register(corpus, name):
    """A JPEG decoded at 1/s is ceil(side / s) pixels, its last one only partly
    source: the answer must map source pixels at exactly 1/s (seen: a 3837 px tall
    photo at 640 px wide strayed by up to 3 levels on average at its bottom)."""
    config = dynimg.load_config()
    data = open(os.path.join(corpus, name), "rb").read()
    spec = dynimg.parse_spec(dynimg.Request(path="/x", query="width=450&format=png"), config)
    answer = numpy.asarray(Image.open(io.BytesIO(dynimg.render(data, spec, config).data))
                           .convert("RGB"), dtype=float)
    image = dynimg.open_image(data, config)
    job = dynimg.Job(None, dynimg.facts_of(image), None, dynimg.LRU(4), 0)
    image.load()
    whole = dynimg.to_srgb(dynimg.orient(image, job), job).convert("RGB")
    reference = numpy.asarray(whole.resize((answer.shape[1], answer.shape[0]),
                                           Image.Resampling.LANCZOS), dtype=float)
    error = numpy.abs(answer - reference).mean(2)
    assert error.mean() < 1.2 and error[:40].mean() < 1.5 and error[-40:].mean() < 1.5
