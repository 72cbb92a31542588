"""gravity=smart and gravity=fp:X,Y: parsing and its attacks, the plan's regions, the
key, and crops of real photos that must keep a subject found by looking."""

import io
import os
import time
import urllib.parse

import numpy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import dynimg
from conftest import PROJECT

#: Subjects in corpus photos, as (left, top, right, bottom) fractions of the upright
#: photo, drawn by looking (bench/crops.py scores every strategy on the same boxes).
LADYBIRD = ("photo-medium-2.jpg", (0.65, 0.44, 0.75, 0.60))
FACE = ("photo-medium-1.jpg", (0.40, 0.26, 0.60, 0.49))
DRAGONFLY = ("photo-large-3.jpg", (0.53, 0.33, 0.61, 0.45))

#: Cover boxes at a few aspects (width x height).
SQUARE, TALL, WIDE = "width=300&height=300", "width=100&height=300", "width=600&height=200"


@pytest.fixture(scope="module")
def shipped():
    """The shipped dynimg.ini: tables of plans and keys need no corpus."""
    return dynimg.load_config(os.path.join(PROJECT, "dynimg.ini"))


def spec_of(config, query, path="/a.jpg"):
    return dynimg.parse_spec(dynimg.Request(path=path, query=query), config)


def plan_of(config, size, query, alpha=False):
    return dynimg.plan_output(dynimg.Facts(size, alpha), spec_of(config, query), config)


def key_of(config, size, query):
    spec = spec_of(config, query)
    return dynimg.image_key(spec, dynimg.plan_output(dynimg.Facts(size, False), spec, config),
                            ("a.jpg", 1000, 1))


def located(answer, source):
    """Where a cover answer's region lies in the upright source, as fractions
    (left, top, right, bottom): found by sliding the answer along the source's one
    cropped side, both reduced to 64 px across the other, least difference wins."""
    grey = answer.convert("L")
    wide = answer.width / answer.height < source.width / source.height
    scale = 64 / (source.height if wide else source.width)
    small = numpy.asarray(source.convert("L").resize(
        (round(source.width * scale), round(source.height * scale)), Image.BOX), float)
    across = (round(64 * answer.width / answer.height), 64) if wide else \
        (64, round(64 * answer.height / answer.width))
    probe = numpy.asarray(grey.resize(across, Image.BOX), float)
    if not wide:
        small, probe = small.T, probe.T
    width = probe.shape[1]
    differences = [numpy.abs(small[:probe.shape[0], offset:offset + width] - probe).mean()
                   for offset in range(small.shape[1] - width + 1)]
    start = int(numpy.argmin(differences)) / small.shape[1]
    end = start + width / small.shape[1]
    return (start, 0.0, end, 1.0) if wide else (0.0, start, 1.0, end)


def holds(region, subject, slack=0.01):
    return (region[0] <= subject[0] + slack and region[1] <= subject[1] + slack
            and region[2] >= subject[2] - slack and region[3] >= subject[3] - slack)


def upright(image_root, name):
    with Image.open(os.path.join(image_root, name)) as image:
        image.load()
        transpose = dynimg.ORIENTATIONS.get(dynimg.facts_of(image).orientation)
        return image.transpose(transpose) if transpose is not None else image.copy()


# --- parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize("value, gravity, point", [
    ("smart", "smart", ()),
    ("center", "center", ()),
    ("fp:0.3,0.7", "fp", (0.3, 0.7)),
    ("fp:0,1", "fp", (0.0, 1.0)),
    ("fp:1,0", "fp", (1.0, 0.0)),
    ("fp:.25,0.5", "fp", (0.25, 0.5)),
    ("fp:1.0,0.000001", "fp", (1.0, 0.000001)),
])
def test_gravity_takes_smart_and_focal_points(shipped, value, gravity, point):
    spec = spec_of(shipped, "fit=cover&w=10&h=10&gravity=" + urllib.parse.quote(value))
    assert (spec.gravity, spec.focal_point) == (gravity, point)


@pytest.mark.parametrize("value", [
    "fp:", "fp", "fp:1.2,0", "fp:0,1.01", "fp:nan,0.5", "fp:0.5", "fp:0.5,", "fp:,0.5",
    "fp:1e999,0", "fp:inf,0", "fp:-0.1,0.5", "fp:-0,0", "fp:+0.5,0.5", "fp:0.5,0.5,0.5",
    "fp:0.5;0.5", "fp:0.5, 0.5", " fp:0.5,0.5", "FP:0.5,0.5", "fp:0x1,0", "fp:1.,0",
    "fp:0.1234567,0.5", "fp:\uff10.5,0.5", "fp:0.5,0.5\n", "Smart", "smart ",
    "fp:" + "0" * 100000 + ",0", "fp:0." + "5" * 100000 + ",0.5", "fp:" + "9" * 100000,
])
def test_bad_gravities_are_a_400_naming_gravity(shipped, value):
    started = time.monotonic()
    with pytest.raises(dynimg.BadRequest) as refused:
        spec_of(shipped, "fit=cover&w=10&h=10&gravity=" + urllib.parse.quote(value))
    assert refused.value.message.startswith("gravity: must be one of center,")
    assert "smart, fp:X,Y" in refused.value.message and len(refused.value.message) < 300
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("query", ["gravity=fp:1.2,0&fit=cover&w=100&h=100",
                                   "gravity=fp:nan,0.5&fit=contain",
                                   "gravity=" + "fp:0.5" * 5000])
def test_bad_focal_points_are_a_400_over_the_app(app, query):
    reply = app.request("/photo-medium-1.jpg", query)
    assert reply.status == 400 and reply.text.startswith("gravity: must be")


# --- the plan's region -----------------------------------------------------------------


@pytest.mark.parametrize("size, query, region", [
    # centred on the point...
    ((4000, 2000), "fp:0.3,0.5", (350, 0, 2050, 2000)),
    ((4000, 2000), "fp:0.7,0", (1950, 0, 3650, 2000)),
    ((2000, 4000), "fp:0.9,0.25", (0, 0, 2000, 2000)),
    ((2000, 4000), "fp:0.5,0.6", (0, 1400, 2000, 3400)),
    # ...as far as the image allows: clamped at the edges
    ((4000, 2000), "fp:0,0", (0, 0, 1700, 2000)),
    ((4000, 2000), "fp:1,1", (2300, 0, 4000, 2000)),
    ((4000, 2000), "fp:0.1,0.5", (0, 0, 1700, 2000)),
    ((2000, 4000), "fp:0.5,0.95", (0, 2000, 2000, 4000)),
    # the same region as center at the centre
    ((4000, 2000), "fp:0.5,0.5", (1150, 0, 2850, 2000)),
])
def test_a_focal_point_centres_the_crop_as_far_as_the_image_allows(shipped, size, query,
                                                                   region):
    box = "width=340&height=400" if size[0] > size[1] else "width=400&height=400"
    plan = plan_of(shipped, size, f"{box}&fit=cover&gravity={query}")
    assert plan.region == pytest.approx(region) and not plan.smart


def test_smart_plans_the_region_size_and_leaves_its_place_to_the_decoded_image(shipped):
    plan = plan_of(shipped, (4000, 2000), "width=340&height=400&fit=cover&gravity=smart")
    assert plan.smart == (340, 400) and plan.size == (340, 400)
    assert plan.region == pytest.approx((1150, 0, 2850, 2000))  # its size; centred till then
    placeholder = plan_of(shipped, (4000, 2000),
                          "width=340&height=400&fit=cover&gravity=smart&placeholder=1")
    assert placeholder.smart == (340, 400) and placeholder.region == plan.region
    assert max(placeholder.size) == dynimg.PLACEHOLDER_SIDE


@pytest.mark.parametrize("query", [
    "width=400&height=200&fit=cover",  # the source's own aspect: nothing to crop
    "width=340&height=400",  # contain, fill and pad crop nothing
    "width=340&height=400&fit=fill",
    "width=340&height=400&fit=pad",
])
def test_smart_is_not_used_where_nothing_is_cropped(shipped, query):
    assert not plan_of(shipped, (4000, 2000), query + "&gravity=smart").smart


@pytest.mark.parametrize("gravity", ["smart", "fp:0.1,0.9", "fp:1,1"])
def test_pad_places_smart_and_focal_points_as_center(shipped, gravity):
    centre = plan_of(shipped, (4000, 2000), "width=340&height=400&fit=pad")
    other = plan_of(shipped, (4000, 2000), f"width=340&height=400&fit=pad&gravity={gravity}")
    assert other == centre and centre.offset == (0, 115)


@settings(max_examples=300, deadline=None)
@given(source=st.tuples(st.integers(1, 100000), st.integers(1, 100000)).filter(
           lambda size: size[0] * size[1] <= 10 ** 8),
       box=st.tuples(st.integers(1, 4000), st.integers(1, 4000)), upscale=st.booleans(),
       point=st.tuples(st.integers(0, 1000), st.integers(0, 1000)))
def test_every_focal_point_region_is_the_box_inside_the_source(shipped, source, box, upscale,
                                                               point):
    query = (f"width={box[0]}&height={box[1]}&fit=cover&upscale={int(upscale)}"
             f"&gravity=fp:{point[0] / 1000},{point[1] / 1000}")
    plan = plan_of(shipped, source, query)
    centre = plan_of(shipped, source, query.split("&gravity")[0])
    left, top, right, bottom = plan.region
    assert -1e-6 <= left < right <= source[0] + 1e-6 and -1e-6 <= top < bottom <= source[1] + 1e-6
    assert (right - left, bottom - top) == pytest.approx(
        (centre.region[2] - centre.region[0], centre.region[3] - centre.region[1]))
    assert plan.size == centre.size


# --- the key ---------------------------------------------------------------------------

COVER = "width=340&height=400&fit=cover"


@pytest.mark.parametrize("first, second", [
    (COVER, COVER + "&gravity=smart"),
    (COVER, COVER + "&gravity=fp:0.3,0.5"),
    (COVER + "&gravity=smart", COVER + "&gravity=fp:0.5,0.5"),
    (COVER + "&gravity=fp:0.3,0.5", COVER + "&gravity=fp:0.4,0.5"),
    (COVER + "&gravity=west", COVER + "&gravity=fp:0.3,0.5"),
])
def test_gravities_that_crop_differently_have_different_keys(shipped, first, second):
    assert key_of(shipped, (4000, 2000), first) != key_of(shipped, (4000, 2000), second)


@pytest.mark.parametrize("first, second, size", [
    (COVER, COVER + "&gravity=fp:0.5,0.5", (4000, 2000)),  # the same region
    (COVER + "&gravity=west", COVER + "&gravity=fp:0,0.3", (4000, 2000)),  # both at the edge
    (COVER + "&gravity=fp:0.3,0.1", COVER + "&gravity=fp:0.3,0.9", (4000, 2000)),  # no room down
    ("width=400&height=200&fit=cover", "width=400&height=200&fit=cover&gravity=smart",
     (4000, 2000)),  # nothing to crop
    ("width=340&height=400", "width=340&height=400&gravity=smart", (4000, 2000)),
    ("width=340&height=400&fit=fill", "width=340&height=400&fit=fill&gravity=fp:0.1,0.1",
     (4000, 2000)),
    ("width=340&height=400&fit=pad", "width=340&height=400&fit=pad&gravity=smart",
     (4000, 2000)),
])
def test_gravities_that_crop_the_same_share_a_key(shipped, first, second, size):
    assert key_of(shipped, size, first) == key_of(shipped, size, second)


# --- smart crops of real photos --------------------------------------------------------


@pytest.mark.parametrize("photo, box", [
    (LADYBIRD, SQUARE), (LADYBIRD, TALL), (LADYBIRD, WIDE),
    (FACE, SQUARE), (FACE, TALL), (FACE, WIDE),
    (DRAGONFLY, SQUARE), (DRAGONFLY, TALL), (DRAGONFLY, WIDE),
])
def test_smart_crops_keep_the_subject(app, image_root, photo, box):
    name, subject = photo
    reply = app.request("/" + name, box + "&fit=cover&gravity=smart")
    assert reply.status == 200
    answer = reply.image()
    assert answer.size == tuple(int(part.split("=")[1]) for part in box.split("&"))
    assert holds(located(answer, upright(image_root, name)), subject)


def test_a_centre_crop_loses_the_ladybird_that_smart_keeps(app, image_root):
    """The check above can fail: centre's tall strip misses the ladybird."""
    name, subject = LADYBIRD
    centre = app.request("/" + name, TALL + "&fit=cover").image()
    assert not holds(located(centre, upright(image_root, name)), subject)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_smart_looks_at_the_upright_image_whatever_the_exif_orientation(app, image_root,
                                                                        orientation):
    """Each file is one photo stored turned or mirrored: upright, smart crops it alike."""
    region = located(app.request(f"/exif-orient-{orientation}.jpg",
                                 TALL + "&fit=cover&gravity=smart").image(),
                     upright(image_root, "exif-orient-1.jpg"))
    reference = located(app.request("/exif-orient-1.jpg", TALL + "&fit=cover&gravity=smart")
                        .image(), upright(image_root, "exif-orient-1.jpg"))
    assert region == pytest.approx(reference, abs=0.02)


@pytest.mark.parametrize("query, centre", [
    (TALL + "&gravity=fp:0.7,0.5", 0.7),
    (TALL + "&gravity=fp:0.2,0.9", 0.2),
    (TALL + "&gravity=fp:0,0", 0.3333 / 3.2),  # clamped: the strip at the left edge
    (TALL + "&gravity=fp:1,1", 1 - 0.3333 / 3.2),
])
def test_focal_point_crops_are_centred_where_asked(app, image_root, query, centre):
    name, _ = LADYBIRD  # 2560x1600: a 1:3 strip is 533 px, 0.208 of the width
    region = located(app.request("/" + name, query + "&fit=cover").image(),
                     upright(image_root, name))
    assert (region[0] + region[2]) / 2 == pytest.approx(centre, abs=0.01)


def render_until_resize(config, data, query):
    """The region smart chooses in a render of query, and the decoded image's size."""
    spec = spec_of(config, query)
    image = dynimg.open_image(data, config)
    facts = dynimg.facts_of(image)
    plan = dynimg.plan_output(facts, spec, config)
    job = dynimg.Job(spec, facts, plan, dynimg.LRU(4), time.monotonic() + 30,
                     config.max_render_mb * 1024 * 1024)
    image = dynimg.decode(image, job, data)
    for step in dynimg.PIPELINE[:dynimg.PIPELINE.index(dynimg.resize)]:
        image = step(image, job)
    return dynimg.shown_region(image, plan), image.size


@pytest.mark.parametrize("name", ["photo-large-3.jpg", "photo-large-1.jpg", "photo-medium-2.jpg",
                                  "photo-large-2.jpg", "exif-orient-6.jpg", "panorama.tif"])
@pytest.mark.parametrize("box", [TALL, WIDE, "width=1200&height=300"])
def test_a_placeholder_shows_the_same_region_as_its_answer(config, image_root, name, box):
    with open(os.path.join(image_root, name), "rb") as file:
        data = file.read()
    query = box + "&fit=cover&gravity=smart"
    answer = render_until_resize(config, data, query)
    placeholder = render_until_resize(config, data, query + "&placeholder=1")
    assert placeholder == answer


def test_smart_gives_the_same_bytes_every_time(config, image_root):
    with open(os.path.join(image_root, "photo-large-3.jpg"), "rb") as file:
        data = file.read()
    spec = spec_of(config, TALL + "&fit=cover&gravity=smart&format=webp")
    first, second = (dynimg.render(data, spec, config) for _ in range(2))
    assert first.data == second.data


@pytest.mark.parametrize("size, mode", [((1, 1), "RGB"), ((5000, 1), "L"), ((1, 5000), "RGBA"),
                                        ((3, 2), "LA"), ((40000, 3), "RGB")])
def test_smart_takes_any_shape_and_mode(size, mode):
    image = Image.new(mode, size, "white" if mode in ("L", "LA") else "red")
    left, top = dynimg.smart_focus(image, size)
    assert 0 <= left <= 1 and 0 <= top <= 1


def test_extreme_sources_crop_smartly_over_the_app(app, image_root):
    folder = os.path.join(image_root, "crop-shapes")
    os.makedirs(folder, exist_ok=True)
    for size in ((20000, 2), (2, 20000), (1, 1)):
        Image.radial_gradient("L").resize(size).save(os.path.join(folder, "%dx%d.png" % size))
        started = time.monotonic()
        reply = app.request("/crop-shapes/%dx%d.png" % size,
                            "width=300&height=300&fit=cover&gravity=smart&upscale=1")
        assert reply.status == 200 and reply.image().size == (300, 300)
        assert time.monotonic() - started < 10


# --- over HTTP -------------------------------------------------------------------------


def test_smart_crops_over_http(server, image_root):
    name, subject = LADYBIRD
    path = f"/images/{name}?{TALL}&fit=cover&gravity=smart"
    first, second = server.get(path), server.get(path)
    assert first.status == second.status == 200
    assert first.headers["X-Image-Key"] == second.headers["X-Image-Key"]
    assert first.body == second.body
    answer = Image.open(io.BytesIO(first.body))
    assert holds(located(answer, upright(image_root, name)), subject)
    centre = server.get(f"/images/{name}?{TALL}&fit=cover")
    assert centre.headers["X-Image-Key"] != first.headers["X-Image-Key"]
    placeholder = server.get(path + "&placeholder=1&format=webp")
    assert placeholder.status == 200 and len(placeholder.body) < 400


def test_focal_point_crops_and_refusals_over_http(server, image_root):
    name, subject = LADYBIRD
    reply = server.get(f"/images/{name}?{TALL}&fit=cover&gravity=fp:0.7,0.52")
    assert reply.status == 200
    assert holds(located(Image.open(io.BytesIO(reply.body)), upright(image_root, name)), subject)
    refused = server.get(f"/images/{name}?{TALL}&fit=cover&gravity=fp:1e999,0")
    assert refused.status == 400 and refused.body.startswith(b"gravity: must be")


def corpus_names():
    from conftest import corpus_dir, read_manifest
    folder = corpus_dir()
    if not os.path.exists(os.path.join(folder, "MANIFEST.tsv")):
        return []
    return [row["file"] for row in read_manifest(folder)]


@pytest.mark.parametrize("name", corpus_names())
def test_every_corpus_file_crops_smartly_or_fails_as_a_centre_crop_does(app, name):
    """Any mode (grey, alpha, palette, 16-bit, CMYK), any shape: smart answers as
    center does, with its box's size, or with the same 4xx."""
    query = "width=120&height=300&fit=cover&format=png"
    smart, centre = (app.request("/" + name, query + gravity)
                     for gravity in ("&gravity=smart", ""))
    assert smart.status == centre.status < 500
    if smart.status == 200:
        assert smart.image().size == centre.image().size
