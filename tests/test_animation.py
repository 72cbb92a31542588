"""Animated sources: every frame kept as an animated WebP where the request takes
WebP, the first frame alone otherwise or over a limit (X-Image-Frames says which),
and hostile animations (frame bombs, huge extents, truncated or lying files)
answered 200 or 422 with bounded work."""

import io
import os
import shutil
import struct
import zlib

import pytest
from PIL import Image, ImageChops, ImageDraw, ImageStat

import dynimg
from conftest import App, ModWsgiExpress, shared_tempdir, write_config
from test_hardening import write_bad

WEBP_AND_AVIF = "image/avif,image/webp,image/apng,image/*,*/*;q=0.8"


def put(image_root, name, data):
    """A source file Apache's user can read, in the shared image root: its name."""
    write_bad(image_root, name, data)
    return name


def saved(frames, fmt, **options):
    buffer = io.BytesIO()
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], **options)
    return buffer.getvalue()


def bands(count, size=(64, 48)):
    """Frames told apart by where a red band is, on blue."""
    frames = []
    for index in range(count):
        frame = Image.new("RGB", size, "#2040c0")
        ImageDraw.Draw(frame).rectangle((index * 8, 0, index * 8 + 7, size[1]), fill="#e02020")
        frames.append(frame)
    return frames


def gif_of(frame_bytes, count, canvas=(16, 16)):
    """A GIF by hand: a screen with a 2-colour palette, then `frame_bytes` `count` times."""
    return (b"GIF89a" + struct.pack("<HH", *canvas) + b"\x80\x00\x00"
            + b"\x00\x00\x00\xff\xff\xff" + frame_bytes * count + b"\x3b")


def tiny_frame(extent=(1, 1), offset=(0, 0), sub_blocks=b"\x02\x44\x01\x00"):
    """One frame: a graphic control extension (10 ms), a descriptor, LZW data."""
    return (b"\x21\xf9\x04\x00\x01\x00\x00\x00" + b"\x2c" + struct.pack("<4H", *offset, *extent)
            + b"\x00\x02" + sub_blocks)


def frames_of(data):
    """(frames as RGBA, durations, loop) of an answer."""
    image = Image.open(io.BytesIO(data))
    frames, durations = [], []
    for index in range(getattr(image, "n_frames", 1)):
        image.seek(index)
        frames.append(image.convert("RGBA"))
        durations.append(image.info.get("duration"))
    return frames, durations, image.info.get("loop")


def source_frames(path):
    image = Image.open(path)
    frames = []
    for index in range(image.n_frames):
        image.seek(index)
        frames.append(image.convert("RGBA"))
    return frames


def on_white(image):
    flat = Image.new("RGB", image.size, "white")
    flat.paste(image, mask=image.convert("RGBA").getchannel("A"))
    return flat


def difference(first, second):
    """Mean absolute difference of R, G and B over white (0 to 255): the colour under
    a transparent pixel is no part of the picture (WebP need not keep it)."""
    return sum(ImageStat.Stat(ImageChops.difference(on_white(first),
                                                    on_white(second))).mean) / 3


@pytest.fixture
def limited(image_root, tmp_path):
    def make(**limits):
        return App(dynimg.load_config(write_config(str(tmp_path), image_root, limits=limits)))
    return make


# --- the limits --------------------------------------------------------------------------


@pytest.mark.parametrize("key, value", [
    ("max_frames", "0"), ("max_frames", str(dynimg.MAX_COUNTED_FRAMES + 1)),
    ("max_frames", "many"), ("max_animation_pixels", "0"), ("max_animation_pixels", "-5"),
])
def test_a_bad_animation_limit_names_section_and_key(tmp_path, image_root, key, value):
    path = write_config(str(tmp_path), image_root, limits={key: value})
    with pytest.raises(dynimg.ConfigError, match=rf"\[limits\] {key}"):
        dynimg.load_config(path)


def test_the_animation_limits_are_read(tmp_path, image_root):
    config = dynimg.load_config(write_config(str(tmp_path), image_root, limits={
        "max_frames": "12", "max_animation_pixels": "3456"}))
    assert (config.max_frames, config.max_animation_pixels) == (12, 3456)
    default = dynimg.load_config(write_config(str(tmp_path / "default"), image_root))
    assert (default.max_frames, default.max_animation_pixels) == (1000, 30_000_000)


# --- the header scan ---------------------------------------------------------------------


def facts(data, config):
    return dynimg.facts_of(dynimg.open_image(data, config), data)


def test_the_corpus_gif_has_its_44_frames_counted_without_decoding(corpus, config):
    with open(os.path.join(corpus, "anim.gif"), "rb") as file:
        data = file.read()
    image = Image.open(io.BytesIO(data))
    scan = dynimg.scan_frames(image, data)
    assert len(scan.durations) == 44 == image.n_frames and scan.problem == ""
    pillow = []
    for index in range(image.n_frames):
        image.seek(index)
        pillow.append(image.info["duration"])
    assert list(scan.durations) == pillow
    assert facts(data, config).frames == 44


def test_a_million_frames_are_counted_no_further_than_the_cap(config):
    data = gif_of(tiny_frame(), 1_000_000)
    assert facts(data, config).frames == dynimg.MAX_COUNTED_FRAMES + 1


def test_a_gif_cut_into_one_byte_sub_blocks_is_not_walked_to_its_end(config):
    frame = tiny_frame(sub_blocks=b"\x02" + b"\x01\x44" * 2_000_000 + b"\x00")
    found = facts(gif_of(frame, 2), config)
    assert found.frames == 2 and found.still_reason == "x"


def test_a_frame_outside_the_canvas_keeps_the_first_frame_alone(config):
    data = gif_of(tiny_frame(), 1)[:-1] + tiny_frame(extent=(60000, 60000)) + b"\x3b"
    assert facts(data, config).still_reason == "o"


def test_a_cut_gif_is_counted_as_unreadable(corpus, config):
    with open(os.path.join(corpus, "anim.gif"), "rb") as file:
        data = file.read()
    found = facts(data[:len(data) // 3], config)
    assert found.frames >= 2 and found.still_reason == "x"


def test_a_still_gif_is_not_animated(config):
    found = facts(gif_of(tiny_frame(), 1), config)
    assert found.frames == 1 and found.still_reason == ""


def test_durations_of_10_ms_or_less_become_100_as_browsers_show_them():
    data = saved(bands(4), "GIF", duration=[0, 50, 200, 10], loop=0)
    image = Image.open(io.BytesIO(data))
    assert dynimg.scan_frames(image, data).durations == (100, 50, 200, 100)


def test_an_apng_default_image_is_not_a_frame_of_the_animation():
    frames = bands(4)
    data = saved(frames, "PNG", default_image=True, duration=[100, 200, 300, 400])
    image = Image.open(io.BytesIO(data))
    scan = dynimg.scan_frames(image, data)
    assert scan.skip == 1 and scan.durations == (100, 200, 300)  # as Pillow wrote them


# --- what the request gets ---------------------------------------------------------------


def test_an_animated_gif_as_webp_keeps_every_frame_resized(app, corpus):
    reply = app.request("/anim.gif", "width=120&format=webp")
    assert reply.status == 200 and reply.headers["Content-Type"] == "image/webp"
    assert reply.headers["X-Image-Frames"] == "all (44)"
    frames, durations, loop = frames_of(reply.body)
    assert len(frames) == 44 and {frame.size for frame in frames} == {(120, 120)}
    source = source_frames(os.path.join(corpus, "anim.gif"))
    for index in (0, 11, 43):
        expected = source[index].resize((120, 120), Image.Resampling.LANCZOS)
        assert difference(frames[index], expected) < 6, index
    assert durations == [90] * 44 and loop == 65535


@pytest.mark.parametrize("query, size", [
    ("width=80&height=40&fit=cover", (80, 40)),
    ("width=80&height=40&fit=fill", (80, 40)),
    ("width=80&height=40&fit=pad&bg=00ff00", (80, 40)),
    ("width=60&height=60", (60, 60)),
])
def test_every_fit_applies_to_every_frame(app, query, size):
    frames, _, _ = frames_of(app.request("/anim.gif", query + "&format=webp").body)
    assert len(frames) == 44 and {frame.size for frame in frames} == {size}
    if "pad" in query:  # the padding is bg on every frame
        for frame in frames[::10]:
            red, green, blue, _ = frame.getpixel((0, 20))
            assert green > 230 and red < 30 and blue < 30


@pytest.mark.parametrize("query", ["width=120", "width=120&format=png", "width=120&format=jpeg",
                                   "width=120&format=webp&placeholder=1"])
def test_other_formats_and_placeholders_keep_the_first_frame_and_say_so(app, query):
    reply = app.request("/anim.gif", query)
    assert reply.status == 200
    assert reply.headers["X-Image-Frames"] == "first (the source is animated)"
    assert getattr(reply.image(), "n_frames", 1) == 1


def test_auto_prefers_webp_to_avif_for_an_animated_source(app):
    reply = app.request("/anim.gif", "width=120&format=auto", headers={"Accept": WEBP_AND_AVIF})
    assert reply.headers["Content-Type"] == "image/webp"
    assert reply.headers["X-Image-Frames"] == "all (44)"
    assert "Accept" in reply.headers["Vary"]
    still = app.request("/photo-medium-1.jpg", "width=120&format=auto",
                        headers={"Accept": WEBP_AND_AVIF})
    assert still.headers["Content-Type"] == ("image/avif" if "avif" in dynimg.AVAILABLE_FORMATS
                                             else "image/webp")


def test_auto_without_webp_in_accept_keeps_the_first_frame(app):
    reply = app.request("/anim.gif", "width=120&format=auto", headers={"Accept": "image/png"})
    assert reply.headers["Content-Type"] == "image/jpeg"
    assert reply.headers["X-Image-Frames"] == "first (the source is animated)"


def test_a_304_and_a_hit_need_no_decode(app):
    animated = app.request("/anim.gif", "width=120&format=webp")
    again = app.request("/anim.gif", "width=120&format=webp",
                        headers={"If-None-Match": animated.headers["ETag"]})
    assert again.status == 304
    hit = app.request("/anim.gif", "width=120&format=webp")
    assert hit.headers["Server-Timing"] == dynimg.CACHE_HIT_TIMING
    assert hit.headers["X-Image-Frames"] == "all (44)" and hit.body == animated.body


def test_the_key_tells_all_frames_from_the_first_alone(app, limited):
    """One cache for both configs: were the keys the same, the second would be
    served the first's animation."""
    animated = app.request("/anim.gif", "width=120&format=webp")
    still = limited(max_frames="43").request("/anim.gif", "width=120&format=webp")
    assert animated.headers["X-Image-Key"] != still.headers["X-Image-Key"]
    assert still.headers["X-Image-Frames"] == "first (over max_frames)"


@pytest.mark.parametrize("facts, query, accept, frames, fmt", [
    (dict(frames=1), "format=webp", "", "s", "webp"),
    (dict(frames=44), "format=webp", "", "44", "webp"),
    (dict(frames=44), "format=jpeg", "", "a", "jpeg"),
    (dict(frames=44), "format=png", "", "a", "png"),
    (dict(frames=44), "format=auto", WEBP_AND_AVIF, "44", "webp"),
    (dict(frames=44, alpha=True), "format=auto", WEBP_AND_AVIF, "44", "webp"),
    (dict(frames=44), "format=auto", "image/png", "a", "jpeg"),
    (dict(frames=44), "format=webp&placeholder=1", "", "a", "webp"),
    (dict(frames=1001), "format=webp", "", "n", "webp"),
    (dict(frames=44, size=(1000, 1000)), "format=webp", "", "p", "webp"),
    (dict(frames=31, size=(1000, 1000)), "format=webp&width=100", "", "p", "webp"),
    (dict(frames=29, size=(1000, 1000)), "format=webp&width=100", "", "29", "webp"),
    (dict(frames=29, size=(100, 100)), "format=webp&width=1100&upscale=1", "", "p", "webp"),
    (dict(frames=44, still_reason="x"), "format=webp", "", "x", "webp"),
    (dict(frames=2, still_reason="a"), "format=webp", "", "a", "webp"),
])
def test_the_plan_decides_frames_from_the_header(config, facts, query, accept, frames, fmt):
    facts = dynimg.Facts(**{"size": (400, 400), "alpha": False, **facts})
    headers = {"Accept": accept} if accept else {}
    spec = dynimg.parse_spec(dynimg.Request(path="/a.gif", query=query, headers=headers),
                             config)
    plan = dynimg.plan_output(facts, spec, config)
    assert (plan.frames, plan.format) == (frames, fmt)
    still = dynimg.plan_output(dynimg.dataclasses.replace(facts, frames=1), spec, config)
    if frames != "s":
        assert dynimg.image_key(spec, plan, ("a", 1, 2)) != dynimg.image_key(
            spec, dynimg.dataclasses.replace(still, format=plan.format), ("a", 1, 2))


@pytest.mark.parametrize("limits, reason", [
    ({"max_frames": "43"}, "over max_frames"),
    ({"max_animation_pixels": str(44 * 400 * 400 - 1)}, "over max_animation_pixels"),
    ({"max_render_mb": "3"}, "over max_render_mb"),
    ({"max_render_seconds": "0.1"}, "over max_render_seconds"),
])
def test_over_a_limit_the_first_frame_goes_out(limited, limits, reason):
    app = limited(**limits)
    reply = app.request("/anim.gif", "format=webp")
    assert reply.status == 200 and reply.headers["X-Image-Frames"] == f"first ({reason})"
    image = reply.image()
    assert image.format == "WEBP" and getattr(image, "n_frames", 1) == 1
    assert image.size == (400, 400)


def test_the_limits_just_met_keep_every_frame(limited):
    app = limited(max_frames="44", max_animation_pixels=str(44 * 400 * 400))
    reply = app.request("/anim.gif", "width=100&format=webp")
    assert reply.headers["X-Image-Frames"] == "all (44)"


def test_over_the_byte_budget_a_still_first_frame_fits_it(app):
    reply = app.request("/anim.gif", "width=300&format=webp&bandwidth=2g")
    assert reply.status == 200
    assert reply.headers["X-Image-Frames"] == "first (over the byte budget)"
    assert len(reply.body) <= app.config.profiles["2g"].max_bytes
    assert getattr(reply.image(), "n_frames", 1) == 1


def test_an_animation_within_the_budget_stays_animated(app, image_root):
    put(image_root, "bands.gif", saved(bands(6), "GIF", duration=100, loop=0))
    reply = app.request("/bands.gif", "format=webp&bandwidth=2g")
    assert reply.headers["X-Image-Frames"] == "all (6)"
    assert len(reply.body) <= app.config.profiles["2g"].max_bytes


@pytest.mark.parametrize("loop, expected", [(0, 0), (3, 4), (65535, 65535), (None, 1)])
def test_a_gif_loop_count_becomes_the_webp_plays(app, image_root, loop, expected):
    options = {"duration": 100} if loop is None else {"duration": 100, "loop": loop}
    name = put(image_root, f"loop-{loop}.gif", saved(bands(3), "GIF", **options))
    _, _, got = frames_of(app.request("/" + name, "format=webp").body)
    assert got == expected


def test_varying_durations_are_kept_and_zero_is_shown_as_browsers_do(app, image_root):
    name = put(image_root, "durations.gif", saved(bands(4), "GIF", duration=[0, 40, 700, 10],
                                                  loop=0))
    _, durations, _ = frames_of(app.request("/" + name, "format=webp").body)
    assert durations == [100, 40, 700, 100]


@pytest.mark.parametrize("fmt, options", [
    ("GIF", {"disposal": 2, "transparency": 0}),
    ("PNG", {"disposal": 1, "blend": 1}),
    ("PNG", {"disposal": 2, "blend": 0}),
    ("WEBP", {"quality": 90}),
])
def test_frames_are_composited_as_the_source_says(app, image_root, fmt, options):
    """Disposal and blending: each output frame is the source's frame as Pillow's
    reader composites it, resized."""
    frames = []
    for index in range(5):
        frame = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
        ImageDraw.Draw(frame).ellipse((index * 8, 8, index * 8 + 20, 28), fill="#e02020")
        frames.append(frame if fmt != "GIF" else frame.convert("RGB").quantize(4))
    name = put(image_root, f"composite-{fmt}-{options}.{fmt.lower()}".replace(" ", ""),
               saved(frames, fmt, duration=100, loop=0, **options))
    reply = app.request("/" + name, "width=32&format=webp")
    assert reply.headers["X-Image-Frames"] == "all (5)"
    got, _, _ = frames_of(reply.body)
    expected = source_frames(os.path.join(image_root, name))
    for index in range(5):
        reference = expected[index].resize((32, 24), Image.Resampling.LANCZOS)
        assert difference(got[index], reference) < 8, index


def test_an_apng_with_a_default_image_animates_its_other_frames(app, image_root):
    name = put(image_root, "default.png", saved(bands(4), "PNG", default_image=True,
                                                duration=100))
    reply = app.request("/" + name, "format=webp")
    assert reply.headers["X-Image-Frames"] == "all (3)"
    assert len(frames_of(reply.body)[0]) == 3
    first = app.request("/" + name, "format=png")
    assert first.headers["X-Image-Frames"] == "first (the source is animated)"


# --- hostile animations ------------------------------------------------------------------


def apng_declaring(frames_declared):
    """An APNG of 3 frames whose acTL says `frames_declared`."""
    data = bytearray(saved(bands(3), "PNG", duration=100))
    at = data.index(b"acTL")
    data[at + 4:at + 8] = struct.pack(">I", frames_declared)
    data[at + 12:at + 16] = struct.pack(">I", zlib.crc32(bytes(data[at:at + 12])))
    return bytes(data)


def broken_frame_gif(corpus):
    """anim.gif with frame 3's LZW code size made 13 (at most 12 is valid), its block
    structure intact: nothing before decoding can tell."""
    with open(os.path.join(corpus, "anim.gif"), "rb") as file:
        data = bytearray(file.read())
    image = Image.open(io.BytesIO(bytes(data)))
    image.seek(3)
    data[image.tile[0][2] - 1] = 13  # the byte before the frame's sub-blocks
    return bytes(data)


def hostile_files(corpus):
    with open(os.path.join(corpus, "anim.gif"), "rb") as file:
        gif = file.read()
    webp_frames = [Image.new("RGB", (8, 8), (index % 256, 0, 0)) for index in range(1100)]
    return {
        "bomb-frames.gif": gif_of(tiny_frame(), 1_000_000),
        "bomb-one-byte-blocks.gif": gif_of(
            tiny_frame(sub_blocks=b"\x02" + b"\x01\x44" * 5_000_000 + b"\x00"), 2),
        "bomb-later-extent.gif": gif_of(tiny_frame(), 1)[:-1]
        + tiny_frame(extent=(65535, 65535)) * 3 + b"\x3b",
        "bomb-first-extent.gif": gif_of(tiny_frame(extent=(65535, 65535)), 2),
        "bomb-offset.gif": gif_of(tiny_frame(), 1)[:-1]
        + tiny_frame(offset=(65000, 65000)) + b"\x3b",
        "cut-third.gif": gif[:len(gif) // 3],
        "cut-in-header.gif": gif[:800],
        "cut-last-byte.gif": gif[:-1],
        "many-frames.webp": saved(webp_frames, "WEBP", duration=20, lossless=True),
        "lying-apng.png": apng_declaring(2 ** 31 - 1),
    }


#: What each hostile file gets as format=webp: (statuses allowed, X-Image-Frames).
HOSTILE = {
    "bomb-frames.gif": ((200,), "first (over max_frames)"),
    "bomb-one-byte-blocks.gif": ((200,), "first (a later frame cannot be read)"),
    "bomb-later-extent.gif": ((200,), "first (a frame lies outside the canvas)"),
    "bomb-first-extent.gif": ((422,), None),
    "bomb-offset.gif": ((200,), "first (a frame lies outside the canvas)"),
    "cut-third.gif": ((200,), "first (a later frame cannot be read)"),
    "cut-in-header.gif": ((200, 422), None),
    "cut-last-byte.gif": ((200,), "all (44)"),
    "many-frames.webp": ((200,), "first (over max_frames)"),
    "lying-apng.png": ((200,), "first (a later frame cannot be read)"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_animations_get_200_or_422(app, image_root, corpus, name):
    put(image_root, name, hostile_files(corpus)[name])
    reply = app.request("/" + name, "width=64&format=webp")
    statuses, frames = HOSTILE[name]
    assert reply.status in statuses
    if frames:
        assert reply.headers["X-Image-Frames"] == frames
    if reply.status == 200:
        reply.image()


def test_a_frame_that_cannot_be_decoded_keeps_the_first_frame(app, image_root, corpus):
    name = put(image_root, "broken-frame.gif", broken_frame_gif(corpus))
    reply = app.request("/" + name, "width=64&format=webp")
    assert reply.status == 200
    assert reply.headers["X-Image-Frames"] == "first (a later frame cannot be read)"


# --- over HTTP, under mod_wsgi-express ----------------------------------------------------


@pytest.fixture(scope="module")
def animation_server(image_root, corpus):
    for name, data in hostile_files(corpus).items():
        put(image_root, name, data)
    folder = shared_tempdir("dynimg-animation-")
    express = ModWsgiExpress(write_config(folder, image_root), processes=1, threads=4)
    yield express
    express.stop()
    shutil.rmtree(folder, ignore_errors=True)


def test_the_corpus_gif_goes_out_animated_over_http(animation_server):
    reply = animation_server.get("/images/anim.gif?width=200&format=webp")
    assert reply.status == 200 and reply.headers["Content-Type"] == "image/webp"
    assert reply.headers["X-Image-Frames"] == "all (44)"
    frames, durations, loop = frames_of(reply.body)
    assert len(frames) == 44 and frames[0].size == (200, 200) and loop == 65535
    auto = animation_server.get("/images/anim.gif?width=200&format=auto",
                                headers={"Accept": WEBP_AND_AVIF})
    assert auto.headers["X-Image-Frames"] == "all (44)" and auto.body == reply.body
    budget = animation_server.get("/images/anim.gif?width=200&format=webp&bandwidth=2g")
    assert budget.headers["X-Image-Frames"] == "first (over the byte budget)"
    assert len(budget.body) <= 16000


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_animations_over_http(animation_server, name):
    reply = animation_server.get(f"/images/{name}?width=64&format=webp")
    statuses, frames = HOSTILE[name]
    assert reply.status in statuses
    if frames:
        assert reply.headers["X-Image-Frames"] == frames
    assert animation_server.get("/images/_health").status == 200
