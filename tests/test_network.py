"""Network- and screen-aware delivery: classes, hints, byte budgets, Vary, the demo."""

import contextlib
import io
import os
import re
import shutil
import tempfile
import time

import pytest
from PIL import Image

import dynimg
from conftest import PROJECT, write_config

HINTS = ("ECT", "Downlink", "Save-Data", "Sec-CH-DPR", "Sec-CH-Viewport-Width", "Sec-CH-Width")


@pytest.fixture(scope="module")
def shipped():
    """The shipped dynimg.ini, whose profiles these tests hold to."""
    return dynimg.load_config(os.path.join(PROJECT, "dynimg.ini"))


def spec_for(config, query, **headers):
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/a.jpg", "QUERY_STRING": query}
    environ.update({"HTTP_" + k.upper().replace("-", "_"): v for k, v in headers.items()})
    return dynimg.parse_spec(dynimg.Request.from_environ(environ), config)


@pytest.mark.parametrize("query, headers, network", [
    ("", {}, "default"),
    ("bandwidth=3g", {}, "3g"),
    ("", {"ECT": "2g"}, "2g"),
    ("", {"ECT": "slow-2g"}, "slow-2g"),
    ("", {"ECT": "4G"}, "4g"),
    ("bandwidth=wifi", {"ECT": "2g"}, "wifi"),          # the URL beats a header
    ("", {"Save-Data": "on"}, "save-data"),
    ("", {"Save-Data": "on", "ECT": "4g"}, "save-data"),
    ("", {"Save-Data": "off", "ECT": "3g"}, "3g"),
    ("", {"Downlink": "0.06"}, "2g"),
    ("", {"Downlink": "0.5"}, "3g"),
    ("", {"Downlink": "25"}, "4g"),
    ("", {"ECT": "3g", "Downlink": "0.01"}, "3g"),      # ECT decides before Downlink
    ("", {"ECT": "5g"}, "default"),                     # garbage is ignored
    ("", {"ECT": "\x00"}, "default"),
    ("", {"Downlink": "fast"}, "default"),
    ("", {"Downlink": "-1"}, "default"),
    ("", {"Downlink": "nan"}, "default"),
])
def test_network_class_comes_from_the_url_then_the_hints(shipped, query, headers, network):
    assert spec_for(shipped, query, **headers).network == network


@pytest.mark.parametrize("query, headers, width, dpr", [
    ("width=300", {}, 300, 1.0),
    ("width=300&dpr=2", {}, 600, 2.0),
    ("width=300", {"Sec-CH-DPR": "2"}, 600, 2.0),
    ("width=300", {"DPR": "2.625"}, 900, 3.0),              # snapped up to a dpr step
    ("width=300&dpr=1", {"Sec-CH-DPR": "3"}, 300, 1.0),     # the URL beats a header
    ("width=300", {"Sec-CH-DPR": "abc"}, 300, 1.0),         # garbage is ignored
    ("width=300", {"Sec-CH-DPR": "1e9"}, 300, 1.0),
    ("width=300&dpr=3&bandwidth=2g", {}, 300, 1.0),         # 2g caps dpr at 1
    ("width=300&bandwidth=3g", {"Sec-CH-DPR": "3"}, 600, 2.0),
    ("", {"Sec-CH-Width": "517"}, 540, 1.0),                # device px, snapped up
    ("", {"Width": "99999"}, 3840, 1.0),                    # clamped to the last step
    ("", {"Sec-CH-Width": "-3"}, None, 1.0),
    ("width=4000&dpr=4", {}, 4000, 3.0),                    # clamped: max_width, max_dpr
])
def test_dpr_and_width_hints(shipped, query, headers, width, dpr):
    spec = spec_for(shipped, query, **headers)
    assert (spec.width, spec.dpr) == (width, dpr)


@pytest.mark.parametrize("query, headers, box", [
    ("screensize=mobile", {}, (360, 800)),
    ("screensize=mobile&dpr=2", {}, (720, 1600)),
    ("screensize=1024x768", {}, (1024, 768)),
    ("screensize=mobile&width=1000", {}, (360, None)),       # capped at the screen
    ("screensize=mobile&width=200&height=300", {}, (200, 300)),
    ("width=2000", {"Sec-CH-Viewport-Width": "412"}, (480, None)),  # viewport snapped up
    ("width=2000", {"Sec-CH-Viewport-Width": "412", "Sec-CH-DPR": "2"}, (960, None)),
    ("", {"Viewport-Width": "375"}, (400, None)),
    ("width=200", {"Viewport-Width": "zzz"}, (200, None)),
])
def test_screen_caps_the_box(shipped, query, headers, box):
    spec = spec_for(shipped, query, **headers)
    assert (spec.width, spec.height) == box


@pytest.mark.parametrize("query, headers, vary", [
    ("width=300&bandwidth=3g&dpr=1", {}, {"Sec-CH-Viewport-Width", "Viewport-Width"}),
    ("width=300&bandwidth=3g&dpr=1&screensize=mobile", {}, set()),
    ("width=300&dpr=1&screensize=mobile", {"ECT": "2g"}, {"ECT", "Save-Data", "Downlink"}),
    ("width=300&dpr=1&screensize=mobile", {}, {"ECT", "Save-Data", "Downlink"}),
    ("width=300&bandwidth=3g&screensize=mobile", {}, {"Sec-CH-DPR", "DPR"}),
    ("width=300&bandwidth=3g&dpr=2", {}, {"Sec-CH-Viewport-Width", "Viewport-Width"}),
    ("bandwidth=3g&dpr=1&screensize=mobile", {}, {"Sec-CH-Width", "Width"}),
    ("width=300&bandwidth=3g&dpr=1&screensize=mobile&format=auto", {}, {"Accept"}),
])
def test_vary_names_exactly_the_headers_that_could_change_the_answer(shipped, query, headers,
                                                                        vary):
    assert set(spec_for(shipped, query, **headers).vary) == vary


HINT_SETS = [{}, {"ECT": "2g"}, {"ECT": "garbage"}, {"Save-Data": "on"}, {"Downlink": "0.3"},
             {"Sec-CH-DPR": "2"}, {"Sec-CH-Width": "500"}, {"Viewport-Width": "390"},
             {"Accept": "image/webp"}, {"ECT": "4g", "Sec-CH-DPR": "3", "Sec-CH-Width": "900",
                                        "Sec-CH-Viewport-Width": "1200", "Save-Data": "?1"}]


@pytest.mark.parametrize("query", ["", "width=300", "height=200", "screensize=mobile",
                                   "width=300&bandwidth=3g", "dpr=2&format=auto",
                                   "width=300&bandwidth=3g&dpr=1&screensize=mobile"])
def test_vary_depends_on_the_url_alone(shipped, query):
    """Caches that keep one Vary list per URL (Apache's mod_cache) lose variants
    stored under another list, so which hints came must not change it."""
    assert len({spec_for(shipped, query, **hints).vary for hints in HINT_SETS}) == 1


def test_a_hint_and_the_equivalent_parameter_share_a_key(shipped):
    identity = ("a.jpg", 1, 1)
    facts = dynimg.Facts(size=(4000, 3000), alpha=False)
    by_hint = spec_for(shipped, "width=300", ECT="3g", **{"Sec-CH-DPR": "2"})
    by_url = spec_for(shipped, "width=300&bandwidth=3g&dpr=2")
    keys = {dynimg.image_key(spec, dynimg.plan_output(facts, spec, shipped), identity)
            for spec in (by_hint, by_url)}
    assert len(keys) == 1
    other = spec_for(shipped, "width=300", ECT="2g", **{"Sec-CH-DPR": "2"})
    assert dynimg.image_key(other, dynimg.plan_output(facts, other, shipped), identity) \
        not in keys


PHOTOS = ["photo-large-1.jpg", "photo-large-3.jpg", "photo-phone.jpg", "photo-medium-2.jpg"]


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("width", [360, 800, 1600])
def test_budgets_hold_and_bytes_grow_with_the_class(shipped, corpus, name, width):
    with open(os.path.join(corpus, name), "rb") as file:
        data = file.read()
    sizes = {}
    for network in ("slow-2g", "2g", "3g", "4g", "wifi"):
        spec = spec_for(shipped, f"bandwidth={network}&width={width}")
        rendered = dynimg.render(data, spec, shipped)
        budget = shipped.profiles[network].max_bytes
        assert not budget or len(rendered.data) <= budget, (network, len(rendered.data))
        assert rendered.quality >= shipped.profiles[network].min_quality
        Image.open(io.BytesIO(rendered.data)).load()
        sizes[network] = len(rendered.data)
    assert sizes["2g"] < sizes["3g"] < sizes["4g"] <= sizes["wifi"]
    assert sizes["slow-2g"] <= sizes["2g"]


def test_budget_search_scales_down_when_quality_alone_cannot_fit(shipped, corpus):
    with open(os.path.join(corpus, "photo-large-1.jpg"), "rb") as file:
        data = file.read()
    spec = spec_for(shipped, "bandwidth=slow-2g&width=1600")
    rendered = dynimg.render(data, spec, shipped)
    assert len(rendered.data) <= spec.max_bytes
    assert rendered.width < 1600 and rendered.quality == spec.min_quality


def test_budget_search_takes_two_or_three_encodes_not_a_bisection(shipped, corpus, monkeypatch):
    """The first guess comes from the typical bytes-by-quality curve, not a bisection."""
    save = dynimg._save
    counts = []
    for name in PHOTOS:
        with open(os.path.join(corpus, name), "rb") as file:
            data = file.read()
        # all over budget at the class's quality: a search, some with scaling down
        for query in ("bandwidth=slow-2g&width=640", "bandwidth=2g&width=1280",
                      "bandwidth=slow-2g&width=1280&format=webp",
                      "bandwidth=2g&width=1280&format=webp"):
            calls = []
            monkeypatch.setattr(dynimg, "_save", lambda *args: calls.append(1) or save(*args))
            spec = spec_for(shipped, query)
            rendered = dynimg.render(data, spec, shipped)
            assert len(rendered.data) <= spec.max_bytes
            counts.append(len(calls))
    assert min(counts) >= 2, counts  # every case needed the search
    assert max(counts) <= 4, counts
    assert sum(count <= 3 for count in counts) >= len(counts) * 0.75, counts


@pytest.mark.parametrize("name", ["photo-large-1.jpg", "photo-large-3.jpg", "photo-phone.jpg"])
def test_a_large_answer_far_over_its_budget_is_never_encoded_whole(shipped, corpus, name,
                                                                    monkeypatch):
    """A 3200 px answer in 120 kB: a small copy says it cannot fit at 3g's quality,
    so the search starts from that prediction, not from an encode of 6-7 Mpx."""
    with open(os.path.join(corpus, name), "rb") as file:
        data = file.read()
    save = dynimg._save
    encoded = []  # (width, quality) of each encode
    monkeypatch.setattr(dynimg, "_save", lambda image, *args: encoded.append(
        (image.width, args[2])) or save(image, *args))
    spec = spec_for(shipped, "bandwidth=3g&width=1600&dpr=2")
    rendered = dynimg.render(data, spec, shipped)
    assert len(rendered.data) <= spec.max_bytes < len(data)
    assert (3200, spec.quality) not in encoded, encoded
    assert encoded[0][0] * 4 < 3200 and len(encoded) <= 3, encoded  # the copy, then 1-2
    assert 1000 < rendered.width < 3200


def test_a_large_answer_within_its_budget_is_encoded_once(shipped, corpus, monkeypatch):
    """Where the budget is generous for the pixels (4g at 3200 px), no copy is made."""
    with open(os.path.join(corpus, "photo-large-1.jpg"), "rb") as file:
        data = file.read()
    save = dynimg._save
    widths = []
    monkeypatch.setattr(dynimg, "_save", lambda image, *args: widths.append(image.width)
                        or save(image, *args))
    spec = spec_for(shipped, "bandwidth=4g&width=1600&dpr=2")
    rendered = dynimg.render(data, spec, shipped)
    assert widths == [3200] and rendered.width == 3200
    assert len(rendered.data) <= spec.max_bytes


def test_an_image_that_cannot_fit_is_sent_and_logged(shipped, corpus, caplog):
    tight = dynimg.dataclasses.replace(spec_for(shipped, "bandwidth=2g&width=800"), max_bytes=50)
    with open(os.path.join(corpus, "photo-medium-2.jpg"), "rb") as file:
        data = file.read()
    with caplog.at_level("WARNING", logger="dynimg"):
        dynimg.log.propagate = True
        try:
            rendered = dynimg.render(data, tight, shipped)
        finally:
            dynimg.log.propagate = False
    assert rendered.data and "cannot fit" in caplog.text


def test_image_responses_ask_for_hints_and_vary(app):
    reply = app.request("/photo-medium-1.jpg", "width=200", headers={"ECT": "2g"})
    assert reply.status == 200
    assert [h.strip() for h in reply.headers["Accept-CH"].split(",")] == list(HINTS)
    assert "ECT" in reply.headers["Vary"] and "Downlink" in reply.headers["Vary"]
    assert reply.headers["X-Image-Network"] == "2g"
    pinned = app.request("/photo-medium-1.jpg", "width=200&bandwidth=3g&dpr=1&screensize=mobile")
    assert "Vary" not in pinned.headers and "Accept-CH" in pinned.headers


@pytest.mark.parametrize("headers", [{"ECT": "\u00ff" * 50}, {"Sec-CH-DPR": "1" * 500},
                                     {"Downlink": "1e400"}, {"Sec-CH-Width": "0x10"},
                                     {"Viewport-Width": "-0"}, {"Save-Data": "maybe"}])
def test_malformed_hints_are_ignored(app, headers):
    assert app.request("/photo-medium-1.jpg", "width=100", headers=headers).status == 200


def test_demo_page_shows_every_class_and_asks_for_hints(app):
    reply = app.request("/_demo", "name=photo-medium-2.jpg&width=400",
                        headers={"ECT": "3g"})
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/html")
    assert "ECT" in reply.headers["Accept-CH"]
    page = reply.text
    for network in ("default", "save-data", "slow-2g", "2g", "3g", "4g", "wifi"):
        assert f' id="{network}" ' in page
        assert f"?bandwidth={network}&amp;width=400" in page
    # the class this browser's hints chose is the one tile marked, and said in words
    assert page.count('class="tile selected"') == 1
    assert '<figure class="tile selected" id="3g" ' in page
    yours = page[page.index('<section id="yours">'):page.index("</section>")]
    assert '<span class="network">3g</span>' in yours
    assert "its connection is like 3g" in yours


def test_demo_tiles_are_rendered_once_then_come_from_the_result_cache(app):
    first = app.request("/_demo", "name=photo-medium-2.jpg&width=300")
    misses = app.dynimg.cache.counts["misses"]
    again = app.request("/_demo", "name=photo-medium-2.jpg&width=300")
    assert first.status == again.status == 200 and first.body == again.body
    assert misses == 7 and app.dynimg.cache.counts["misses"] == misses


def test_demo_can_be_turned_off(tmp_path, image_root):
    config = dynimg.load_config(write_config(str(tmp_path), image_root,
                                             server={"demo": "no"}))
    off = dynimg.App(config)
    response, _ = off.respond(dynimg.Request(path="/_demo", query="name=photo-medium-1.jpg"))
    assert response.status == 404


def test_demo_without_a_name_is_a_400(app):
    assert app.request("/_demo").status == 400


def test_demo_tiles_ask_for_the_format_the_demo_was_asked(app):
    page = app.request("/_demo", "name=photo-medium-1.jpg&width=200&format=webp").text
    # seven tiles, each URL in the image, the magnified image, the link and its text;
    # the panel's own image and its link
    assert page.count("&amp;format=webp") == 7 * 4 + 3 and page.count(" px WEBP,") == 8
    assert app.request("/_demo", "name=photo-medium-1.jpg&format=gif").status == 400
    assert app.request("/_demo", "name=photo-medium-1.jpg&format=%3Cb%3E").status == 400


# --- a real browser -------------------------------------------------------------

CHROMIUM = "/usr/bin/chromium"


@contextlib.contextmanager
def chromium_page(connection_type="4G", viewport=None):
    """A page in headless Chromium (driven by Playwright), forced to a connection type."""
    playwright = pytest.importorskip("playwright.sync_api")
    profile = tempfile.mkdtemp(prefix="dynimg-chromium-")
    try:
        with playwright.sync_playwright() as driver:
            browser = driver.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, viewport=viewport, args=[
                    "--headless", "--no-sandbox", "--disable-gpu",
                    "--disable-background-networking", "--disable-component-update",
                    "--no-first-run", "--disable-quic", "--disable-sync",
                    f"--force-effective-connection-type={connection_type}"])
            try:
                yield browser.new_page()
            finally:
                browser.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def browse_demo(server, connection_type, url, query="width=640"):
    """Load the demo in headless Chromium forced to a connection type; return the
    panel's class and the log lines the server wrote meanwhile (once the line for
    the panel's image, photo-large-3.jpg?QUERY, is among them)."""
    before = len(server.log())
    with chromium_page(connection_type) as page:
        page.goto(url, wait_until="load")
        panel = page.inner_text("#yours .network")
    # the server writes each log line just after its response: wait for the image's
    deadline = time.monotonic() + 10
    while f"GET /photo-large-3.jpg?{query} " not in server.log()[before:] \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    return panel, server.log()[before:]


def need_chromium():
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed (make installs it)")
        pytest.skip("chromium is not installed (make test installs it)")


def test_chromium_on_2g_receives_a_smaller_image_than_on_4g(server):
    need_chromium()
    url = f"http://127.0.0.1:{server.port}/images/_demo?name=photo-large-3.jpg&width=640"
    sent = {}
    for connection_type, expected in (("2G", "2g"), ("4G", "4g")):
        panel, log = browse_demo(server, connection_type, url)
        assert panel == expected
        # the image the browser's own hints chose: the URL without bandwidth=
        lines = re.findall(r"GET /photo-large-3\.jpg\?width=640 200 (\d+) bytes net=(\S+)", log)
        assert lines, log[-2000:]
        assert {network for _, network in lines} == {expected}
        sent[expected] = int(lines[-1][0])
    assert sent["2g"] < sent["4g"]
    assert sent["2g"] <= dynimg.load_config(os.path.join(PROJECT, "dynimg.ini")) \
        .profiles["2g"].max_bytes


@pytest.mark.skipif(not dynimg.AVIF_ENCODER, reason="AVIF plugin not installed (AVIF=no)")
def test_chromium_asking_format_auto_receives_avif(server):
    need_chromium()
    url = (f"http://127.0.0.1:{server.port}/images/_demo?name=photo-large-3.jpg&width=640"
           "&format=auto")
    panel, log = browse_demo(server, "4G", url, query="width=640&format=auto")
    assert panel == "4g"
    # every tile and the panel's image went out as AVIF, said the server's log
    lines = re.findall(r"GET /photo-large-3\.jpg\?(\S*format=auto) 200 \d+ bytes net=\S+ "
                       r"type=(\S+)", log)
    # seven tiles and the panel's own image
    assert len({query for query, _ in lines}) == 8, log[-2000:]
    assert {media for _, media in lines} == {"image/avif"}
    # and no encoder banner reached Apache's error log
    assert "Svt[info]" not in server.log() and "SVT [version]" not in server.log()


@pytest.mark.parametrize("query, progressive", [
    ("width=400&bandwidth=2g", True),
    ("width=400&bandwidth=3g", True),
    ("width=400&bandwidth=4g", False),
    ("width=400&bandwidth=wifi", False),
    ("width=400", False),  # the default class
    ("width=150&bandwidth=3g", False),  # below 200x200 progressive costs bytes
])
def test_jpegs_are_progressive_only_where_the_link_is_slow(app, query, progressive):
    image = app.request("/photo-large-2.jpg", query).image()
    assert bool(image.info.get("progressive")) == progressive


@pytest.mark.parametrize("connection_type, expected", [("3G", "3g"), ("2G", "2g")])
def test_chromium_draws_each_demo_tile_at_the_asked_width_and_marks_its_class(
        server, connection_type, expected):
    need_chromium()
    url = f"http://127.0.0.1:{server.port}/images/_demo?name=photo-medium-2.jpg&width=560"
    with chromium_page(connection_type, viewport={"width": 1400, "height": 900}) as page:
        page.goto(url, wait_until="load")
        tiles = page.eval_on_selector_all(".tile", "tiles => tiles.map(tile => ["
                                          "tile.id, tile.dataset.shownWidth, "
                                          "tile.classList.contains('selected'), "
                                          "tile.querySelector('img.shown').naturalWidth])")
        panel = page.inner_text("#yours .network")
        # "See it arrive": the wifi image replays in a fraction of a second, to its
        # last byte, the slow-2g one is still arriving
        page.click("#replay")
        page.wait_for_function("/ ([\\d,]+) of \\1 bytes/.test("
                               "document.querySelector('#wifi .clock').textContent)",
                               timeout=10000)
        slow = page.inner_text("#slow-2g .clock")
    assert re.match(r"\d+\.\d s: [\d,]+ of [\d,]+ bytes", slow)
    got, total = (int(number.replace(",", ""))
                  for number in re.findall(r"([\d,]+) (?:of|bytes)", slow))
    assert got < total, slow
    assert [tile[0] for tile in tiles] == list(dynimg.DEMO_CLASSES)
    assert {float(tile[1]) for tile in tiles} == {560.0}  # as laid out by the browser
    assert all(tile[3] > 0 for tile in tiles)  # every image arrived and decoded
    assert panel == expected and [tile[0] for tile in tiles if tile[2]] == [expected]


def test_chromium_shows_the_html_snippets_placeholder_until_the_image_comes(server):
    need_chromium()
    base = f"http://127.0.0.1:{server.port}/images"
    markup = server.get("/images/_html?name=photo-large-2.jpg&sizes=400px").text
    markup = markup.replace('src="/images/', f'src="{base}/')
    markup = markup.replace("       /images/", f"       {base}/")
    with chromium_page("4G", viewport={"width": 800, "height": 700}) as page:
        # the images never come: what shows is the placeholder alone
        page.route("**/photo-large-2.jpg?*", lambda route: route.abort())
        page.set_content(f"<body style='margin:0'>{markup}</body>")
        page.wait_for_timeout(300)
        shot = Image.open(io.BytesIO(page.locator("img").screenshot()))
        page.unroute("**/photo-large-2.jpg?*")
        eager = markup.replace('loading="lazy"', "")
        page.set_content(f"<body style='margin:0'>{eager}</body>")
        page.wait_for_function("document.querySelector('img').complete")
        loaded = page.eval_on_selector("img", "image => [image.naturalWidth, image.currentSrc]")
    # a blurred picture of the photo: not blank, not one colour
    assert shot.size[0] == 400
    extremes = shot.convert("L").getextrema()
    assert extremes[1] - extremes[0] > 40, extremes
    assert loaded[0] >= 400 and "&format=auto" in loaded[1] and "&dpr=1" in loaded[1]
