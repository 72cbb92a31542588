"""AVIF: as output (format=avif, format=auto) and as input, hostile files included,
and dynimg without the AVIF plugin; budgets spent on width and quality together."""

import io
import json
import os
import struct
import subprocess
import sys
import time

import pytest
from PIL import Image

import dynimg
from conftest import PROJECT, App, write_config
from test_inputs import difference, reference

pytestmark = pytest.mark.skipif(not dynimg.AVIF_ENCODER,
                                reason="AVIF plugin not installed (AVIF=no)")

CHROME = "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"
PHOTOS = ("photo-large-2.jpg", "photo-large-portrait.jpg", "photo-phone.jpg",
          "icc-adobergb.jpg")


def avif_bytes(image, **options):
    buffer = io.BytesIO()
    image.save(buffer, "AVIF", **{"codec": "aom", "speed": 9, **options})
    return buffer.getvalue()


def put(root, name, data):
    path = os.path.join(root, name)
    with open(path, "wb") as file:
        file.write(data)
    os.chmod(path, 0o644)
    return path


def with_box_field(data, kind, offset, value):
    """The file with a 32-bit field of the first `kind` box replaced."""
    at = data.index(kind) + 4 + offset
    return data[:at] + struct.pack(">I", value) + data[at + 4:]


# --- output ----------------------------------------------------------------------


@pytest.mark.parametrize("name", PHOTOS + ("png-alpha.png", "grayscale.jpg", "tiny-1x1.png"))
def test_format_avif_is_an_avif_of_the_asked_size(app, corpus, name):
    reply = app.request("/" + name, "width=300&format=avif")
    assert reply.status == 200 and reply.headers["Content-Type"] == "image/avif"
    image = reply.image()
    assert image.format == "AVIF"
    expected = reference(os.path.join(corpus, name))
    assert image.size == dynimg.plan_output(
        dynimg.Facts(expected.size, False), dynimg.parse_spec(
            dynimg.Request(path="/" + name, query="width=300"), app.config),
        app.config).size
    assert difference(image, expected) < 8
    assert ("A" in image.mode) == (name == "png-alpha.png")


@pytest.mark.parametrize("network", ["slow-2g", "2g", "save-data", "3g"])
@pytest.mark.parametrize("fmt", ["avif", "webp", "jpeg"])
def test_budgets_hold_in_every_format(app, network, fmt):
    budget = app.config.profiles[network].max_bytes
    # Save-Data is a header only; the other classes may be named in the URL
    query, headers = (("", {"Save-Data": "on"}) if network == "save-data"
                      else (f"&bandwidth={network}", {}))
    for name in PHOTOS:
        reply = app.request("/" + name, f"width=1600&format={fmt}{query}", headers=headers)
        assert reply.status == 200 and reply.headers["X-Image-Network"] == network
        assert len(reply.body) <= budget, (name, reply.headers["X-Image-Size"])


@pytest.mark.parametrize("fmt", ["avif", "webp", "jpeg"])
def test_a_tight_budget_buys_a_narrower_image_at_a_quality_that_looks_right(app, fmt):
    for name in PHOTOS:
        answers = {network: app.request("/" + name, f"width=800&bandwidth={network}&format={fmt}")
                   for network in ("2g", "3g")}
        widths = {network: int(reply.headers["X-Image-Size"].split("x")[0])
                  for network, reply in answers.items()}
        assert widths["2g"] < widths["3g"] == 800, name
        # the width gave way only as far as it had to: 15 % wider at the class's
        # floor quality would not fit the budget
        profile = app.config.profiles["2g"]
        assert int(answers["2g"].headers["X-Image-Quality"]) == profile.min_quality
        spec = dynimg.parse_spec(dynimg.Request(
            path="/" + name, query=f"width={round(widths['2g'] * 1.15)}&format={fmt}"
            f"&quality={profile.min_quality}"), app.config)
        with open(os.path.join(app.config.image_root, name), "rb") as file:
            wider = dynimg.render(file.read(), spec, app.config)
        assert len(wider.data) > profile.max_bytes, name


def test_an_avif_encode_leaves_the_threads_scheduling_alone(app):
    """SVT-AV1 makes the encoding thread real-time where it may (as root): a render
    thread must come back as it went, or it starves its core (and whatever it
    starts inherits the policy)."""
    before = os.sched_getscheduler(0), os.sched_getparam(0)
    assert app.request("/photo-large-2.jpg", "width=1600&format=avif").status == 200
    assert (os.sched_getscheduler(0), os.sched_getparam(0)) == before


@pytest.mark.parametrize("width, method, speed", [(400, 6, 6), (800, 4, 8)])
def test_small_answers_take_the_slower_smaller_encoder_settings(app, monkeypatch, width,
                                                                method, speed):
    save, options = Image.Image.save, {}
    monkeypatch.setattr(Image.Image, "save", lambda image, buffer, kind, **kwargs: (
        options.__setitem__(kind, kwargs), save(image, buffer, kind, **kwargs))[1])
    for fmt in ("webp", "avif"):
        assert app.request("/photo-large-2.jpg", f"width={width}&format={fmt}").status == 200
    assert options["WEBP"]["method"] == method
    assert options["AVIF"]["speed"] == speed and options["AVIF"]["codec"] == "svt"


@pytest.mark.parametrize("width, accept, expected", [
    (2000, CHROME, "avif"), (4000, CHROME, "webp"),
    (4000, "image/avif,image/*", "jpeg"), (4000, "image/avif,image/webp;q=0", "jpeg")])
def test_a_negotiated_avif_larger_than_its_bound_takes_the_next_format(app, width, accept,
                                                                       expected):
    """photo-large-1 at 4000 px is 9 Mpx, past AUTO_AVIF_MAX_PIXELS: format=auto
    sends the next format the client takes."""
    reply = app.request("/photo-large-1.jpg", f"width={width}&format=auto",
                        headers={"Accept": accept})
    assert reply.status == 200 and reply.headers["Content-Type"] == f"image/{expected}"
    assert reply.image().width == width


def test_a_large_answer_with_alpha_falls_back_to_png_not_to_jpeg(app):
    reply = app.request("/png-alpha.png", "width=3000&height=3000&forcefit=1&format=auto",
                        headers={"Accept": "image/avif,image/*"})
    assert reply.status == 200 and reply.headers["Content-Type"] == "image/png"
    assert reply.image().mode in ("RGBA", "LA", "P")


def test_a_negotiated_avif_that_would_pass_max_render_mb_with_its_decode_falls_back(
        tmp_path, image_root):
    """At a 300 MB limit, 5.1 Mpx of AVIF (213 MB) fits alone but not on the decode of
    a 13 Mpx progressive JPEG (153 MB): WebP then, where format=avif is a 422; 4 Mpx
    (168 MB) fits with it."""
    tight = App(dynimg.load_config(write_config(str(tmp_path), image_root,
                                                limits={"max_render_mb": "300"})))
    query = "width=2600&format="
    negotiated = tight.request("/photo-large-3.jpg", query + "auto", headers={"Accept": CHROME})
    assert negotiated.status == 200 and negotiated.headers["Content-Type"] == "image/webp"
    assert tight.request("/photo-large-3.jpg", query + "avif").status == 422
    assert tight.request("/photo-large-3.jpg", "width=2000&format=auto",
                         headers={"Accept": CHROME}).headers["Content-Type"] == "image/avif"


def test_the_fall_back_judges_a_source_by_its_own_decoder(tmp_path, image_root):
    """A WebP source's decoder takes 19 bytes a pixel, more than a JPEG's 12: at a 44
    MB limit its 1024 px AVIF answer (46 MB with the decode) is over, as WebP (23 MB)
    it is not; judged as a JPEG, the AVIF would be planned and refused."""
    tight = App(dynimg.load_config(write_config(str(tmp_path), image_root,
                                                limits={"max_render_mb": "44"})))
    negotiated = tight.request("/webp-lossy.webp", "width=1024&format=auto",
                               headers={"Accept": CHROME})
    assert negotiated.status == 200 and negotiated.headers["Content-Type"] == "image/webp"
    assert tight.request("/webp-lossy.webp", "width=1024&format=avif").status == 422
    assert tight.request("/webp-lossy.webp", "width=600&format=auto",
                         headers={"Accept": CHROME}).headers["Content-Type"] == "image/avif"


def test_asked_for_by_name_a_large_avif_is_made_or_refused_by_max_render_mb(app):
    made = app.request("/photo-large-1.jpg", "width=4000&format=avif")
    assert made.status == 200 and made.headers["Content-Type"] == "image/avif"
    # 12 Mpx of AVIF (~500 MB) on the decode of a progressive 13 Mpx JPEG (~160 MB)
    refused = app.request("/photo-large-3.jpg", "width=4000&format=avif")
    assert refused.status == 422 and "max_render_mb" in refused.headers["X-Image-Error"]
    assert app.request("/photo-large-3.jpg", "width=4000&format=webp").status == 200


def test_avif_quality_follows_the_jpeg_scale(app):
    """quality= means the same look in every format: AVIF at a quality is smaller
    than JPEG at it, and grows with it."""
    sizes = {(fmt, quality): len(app.request("/photo-large-2.jpg",
                                             f"width=800&quality={quality}&format={fmt}").body)
             for fmt in ("jpeg", "avif") for quality in (40, 80)}
    assert sizes["avif", 40] < sizes["avif", 80]
    assert sizes["avif", 80] < 0.85 * sizes["jpeg", 80]
    assert dynimg.encoder_quality("avif", 80) == 75
    assert dynimg.encoder_quality("webp", 80) == 88
    assert dynimg.encoder_quality("avif", 65) == 61  # between the table's points
    assert dynimg.encoder_quality("jpeg", 80) == 80


def test_error_pictures_follow_the_negotiated_format(app):
    reply = app.request("/no-such-photo.jpg", "width=200&format=auto", headers={"Accept": CHROME})
    assert reply.status == 404 and reply.headers["Content-Type"] == "image/avif"
    assert reply.image().width == 200


def test_auto_formats_sets_the_order(tmp_path, image_root):
    app = App(dynimg.load_config(write_config(str(tmp_path), image_root,
                                              output={"auto_formats": "webp avif"})))
    reply = app.request("/photo-medium-1.jpg", "width=100&format=auto", headers={"Accept": CHROME})
    assert reply.headers["Content-Type"] == "image/webp"
    assert app.config.auto_formats == ("webp", "avif", "jpeg")
    with pytest.raises(dynimg.ConfigError, match=r"\[output\] auto_formats"):
        dynimg.load_config(write_config(str(tmp_path), image_root,
                                        output={"auto_formats": "avif heic"}))


# --- input -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["photo-medium-1.jpg", "png-alpha.png", "grayscale.jpg",
                                  "photo-large-portrait.jpg"])
def test_avif_sources_are_read(app, image_root, corpus, name):
    expected = reference(os.path.join(corpus, name))
    put(image_root, name + ".avif", avif_bytes(expected, quality=90))
    reply = app.request(f"/{name}.avif", "width=200&height=200&format=png")
    assert reply.status == 200, reply.headers.get("X-Image-Error")
    image = reply.image()
    scale = min(1, 200 / expected.width, 200 / expected.height)
    assert image.size == (round(expected.width * scale), round(expected.height * scale))
    assert difference(image, expected) < 8


@pytest.fixture
def hostile(tmp_path, image_root):
    """An app with a small render budget (50 MB), and a folder for hostile files."""
    folder = os.path.join(image_root, "hostile-avif")
    os.makedirs(folder, mode=0o755, exist_ok=True)
    config = write_config(str(tmp_path), image_root, limits={"max_render_mb": "50"})
    return App(dynimg.load_config(config)), folder


def test_an_avif_whose_header_claims_more_than_the_limits_is_a_422(hostile):
    app, folder = hostile
    small = avif_bytes(Image.new("RGB", (64, 64), "#336699"))
    # ispe: version and flags, then width and height
    put(folder, "huge.avif", with_box_field(with_box_field(small, b"ispe", 4, 60000),
                                            b"ispe", 8, 60000))
    put(folder, "big.avif", with_box_field(with_box_field(small, b"ispe", 4, 3000),
                                           b"ispe", 8, 3000))
    for name in ("huge.avif", "big.avif"):
        reply = app.request(f"/hostile-avif/{name}", "width=100")
        assert reply.status == 422, name


def test_an_avif_whose_frame_is_larger_than_its_header_says_is_a_422(hostile):
    """A 1 kB file saying 100x100 around a 3000x3000 frame: the decoder would make
    the whole frame (here 9 Mpx, 170 MB, over the 50 MB budget) before scaling it."""
    app, folder = hostile
    frame = avif_bytes(Image.new("RGB", (3000, 3000), "#336699"))
    lying = with_box_field(with_box_field(frame, b"ispe", 4, 100), b"ispe", 8, 100)
    assert len(lying) < 4000
    put(folder, "lie.avif", lying)
    assert dynimg.av1_frame_pixels(lying) == 9_000_000
    started = time.monotonic()
    reply = app.request("/hostile-avif/lie.avif", "width=100")
    assert reply.status == 422
    assert "max_render_mb" in reply.headers["X-Image-Error"]
    assert time.monotonic() - started < 1
    # the honest 100x100 file is served
    put(folder, "honest.avif", avif_bytes(Image.new("RGB", (100, 100), "#336699")))
    assert app.request("/hostile-avif/honest.avif", "width=50").status == 200


def with_av1_item(data, change):
    """The file with its AV1 item's bytes (at the end of mdat, where encoders put
    them) replaced by change(old bytes); the iloc length and mdat size follow."""
    view = memoryview(data)
    meta = dynimg._box(view, 0, len(data), b"meta")
    iloc = dynimg._box(view, meta[0] + 4, meta[1], b"iloc")
    [(_, _, [(offset, length)])] = [item for item in dynimg._item_extents(view, *iloc)
                                    if item[0] == 1]
    assert offset + length == len(data), "the item ends the file"
    payload = change(data[offset:])
    field = struct.pack(">II", offset, length)
    assert data.count(field) == 1
    data = data.replace(field, struct.pack(">II", offset, len(payload)))
    mdat = data.index(b"mdat") - 4
    size = struct.unpack_from(">I", data, mdat)[0] + len(payload) - length
    return data[:mdat] + struct.pack(">I", size) + data[mdat + 4:offset] + payload


def obus(item):
    """An AV1 item's OBUs as (type, whole OBU bytes)."""
    found, position = [], 0
    while position < len(item):
        kind = item[position] >> 3 & 15
        size, length = dynimg._leb128(item, position + 1)
        found.append((kind, item[position:position + 1 + length + size]))
        position += 1 + length + size
    return found


@pytest.mark.parametrize("layout, change", [
    ("a padding OBU first", lambda item: b"\x7a\x00" + item),
    ("two temporal delimiters", lambda item: b"\x12\x00" + item),
    ("metadata after the delimiter", lambda item: item[:2] + b"\x2a\x01\x00" + item[2:]),
    ("a small sequence header before the real one", None),
])
def test_the_frame_is_measured_whatever_the_obus_around_it(hostile, layout, change):
    """Decoders skip OBUs they do not need and take the last sequence header: the
    3000x3000 frame behind a 100x100 header is found in each layout."""
    app, folder = hostile
    frame = avif_bytes(Image.new("RGB", (3000, 3000), "#336699"))
    frame = with_box_field(with_box_field(frame, b"ispe", 4, 100), b"ispe", 8, 100)
    if change is None:
        small = avif_bytes(Image.new("RGB", (100, 100), "#336699"))
        header = [obu for kind, obu in obus(small[-(len(small) - small.index(b"mdat") - 4):])
                  if kind == 1][0]
        change = lambda item: header + item  # noqa: E731
    lying = with_av1_item(frame, change)
    put(folder, "layout.avif", lying)
    assert dynimg.av1_frame_pixels(lying) == 9_000_000
    reply = app.request("/hostile-avif/layout.avif", "width=100")
    assert reply.status == 422 and "max_render_mb" in reply.headers["X-Image-Error"], layout


def test_broken_avif_files_are_a_422_never_a_500(hostile):
    app, folder = hostile
    good = avif_bytes(Image.open(os.path.join(folder, "..", "photo-medium-1.jpg")))
    iloc = good.index(b"iloc")
    broken = {
        "truncated.avif": good[:len(good) // 2],
        "cut-at-the-end.avif": good[:-10],
        "header-only.avif": good[:40],
        # an iloc box that claims 60,000 items
        "items.avif": good[:iloc + 10] + struct.pack(">H", 60000) + good[iloc + 12:],
        # the iloc box's size pointing past the end of its parent
        "overrun.avif": good[:iloc - 4] + struct.pack(">I", 1 << 30) + good[iloc:],
        # coded data overwritten
        "noise.avif": good[:len(good) - 2000] + os.urandom(1990) + good[-10:],
        # the primary item is one that does not exist; an item type no decoder knows
        "no-primary.avif": (good[:good.index(b"pitm") + 8] + struct.pack(">H", 7)
                            + good[good.index(b"pitm") + 10:]),
        "av02.avif": good.replace(b"av01", b"av02"),
        # a million bytes of empty boxes after the picture
        "boxes.avif": good + struct.pack(">I4s", 8, b"free") * 125_000,
    }
    for name, data in broken.items():
        put(folder, name, data)
        reply = app.request(f"/hostile-avif/{name}", "width=100")
        assert reply.status in (200, 422), (name, reply.status)
        if reply.status == 200:
            assert reply.image().width == 100
    for name in ("truncated.avif", "items.avif", "no-primary.avif", "av02.avif"):
        assert app.request(f"/hostile-avif/{name}", "width=100").status == 422, name
    # dynimg's own reader refuses what the decoder might take, and fast
    for name, data in (("items.avif", broken["items.avif"]),
                       ("overrun.avif", broken["overrun.avif"]),
                       ("boxes.avif", broken["boxes.avif"])):
        started = time.monotonic()
        with pytest.raises(dynimg.Unprocessable):
            dynimg.av1_frame_pixels(data)
        assert time.monotonic() - started < 0.5, name


def test_an_avif_image_sequence_is_a_422(hostile):
    app, folder = hostile
    frames = [Image.new("RGB", (64, 64), colour) for colour in ("red", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, "AVIF", save_all=True, append_images=frames[1:], codec="aom",
                   speed=9)
    put(folder, "sequence.avif", buffer.getvalue())
    reply = app.request("/hostile-avif/sequence.avif", "width=50")
    assert reply.status == 422 and "sequence" in reply.headers["X-Image-Error"]


# --- without the plugin ------------------------------------------------------------


WITHOUT_PLUGIN = r"""
import json, sys
sys.modules["pillow_avif"] = None  # as if it were not installed
sys.path.insert(0, sys.argv[1])
import dynimg

app = dynimg.App(dynimg.load_config(sys.argv[2]))
def get(path, query, accept=""):
    reply = {}
    def start_response(status, headers):
        reply.update(status=int(status.split()[0]), headers=dict(headers))
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": query,
               "SCRIPT_NAME": "/images", "HTTP_ACCEPT": accept, "wsgi.input": None}
    body = b"".join(app(environ, start_response))
    reply["text"] = body.decode() if reply["status"] == 400 else ""
    return reply
chrome = "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"
result = {
    "encoder": dynimg.AVIF_ENCODER,
    "available": dynimg.AVAILABLE_FORMATS,
    "auto_formats": app.config.auto_formats,
    "auto": get("/photo-medium-1.jpg", "width=100&format=auto", chrome)["headers"]["Content-Type"],
    "avif": get("/photo-medium-1.jpg", "width=100&format=avif"),
    "avif_source": get("/source.avif", "width=100")["status"],
}
try:
    dynimg.load_config(sys.argv[3])
except dynimg.ConfigError as error:
    result["config_error"] = str(error)
print(json.dumps(result))
"""


def test_without_the_plugin_auto_falls_back_to_webp_and_avif_is_a_400(tmp_path, image_root):
    put(image_root, "source.avif", avif_bytes(Image.new("RGB", (64, 64), "#336699")))
    config = write_config(str(tmp_path / "plain"), image_root)
    asking_avif = write_config(str(tmp_path / "avif"), image_root, output={"format": "avif"})
    result = json.loads(subprocess.run(
        [sys.executable, "-c", WITHOUT_PLUGIN, PROJECT, config, asking_avif],
        check=True, capture_output=True, text=True).stdout)
    assert result["encoder"] is None
    assert result["available"] == ["jpeg", "webp", "png"]
    assert result["auto_formats"] == ["webp", "jpeg"]
    assert result["auto"] == "image/webp"
    assert result["avif"]["status"] == 400
    assert result["avif"]["text"] == (
        "format: avif is not available on this server; one of jpeg, webp, png, auto\n")
    assert result["avif_source"] == 422
    assert "[output] format = 'avif'" in result["config_error"]
