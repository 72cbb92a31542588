"""Layer 1: the pure parts, as tables (request parsing, keys, HTTP policy, geometry)."""

import os

import pytest

import dynimg
from conftest import PROJECT


@pytest.fixture(scope="module")
def config():
    """The shipped dynimg.ini: these tables need no corpus."""
    return dynimg.load_config(os.path.join(PROJECT, "dynimg.ini"))


def spec_for(config, query="", path="/", **headers):
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": query}
    environ.update({"HTTP_" + k.upper(): v for k, v in headers.items()})
    return dynimg.parse_spec(dynimg.Request.from_environ(environ), config)


@pytest.mark.parametrize("query, expected", [
    ("name=a.jpg&width=340&height=400", dict(name="a.jpg", width=340, height=400, fit="contain")),
    ("name=a.jpg&w=340&h=400", dict(width=340, height=400)),
    ("name=a.jpg&forcefit=1&width=10&height=20", dict(fit="fill")),
    ("name=a.jpg&forcefit=no", dict(fit="contain")),
    ("name=a.jpg&fit=cover&gravity=north", dict(fit="cover", gravity="north")),
    ("name=a.jpg&gravity=north", dict(gravity="north")),  # checked; no new key (see below)
    ("name=a.jpg&q=55", dict(quality=55)),
    ("name=a.jpg&format=webp", dict(format="webp")),
    ("name=a.jpg&bg=F00", dict(bg="ff0000")),
    ("name=a.jpg&upscale=yes", dict(upscale=True)),
    ("name=sub/dir/a.jpg", dict(name="sub/dir/a.jpg")),
    ("name=./a.jpg", dict(name="a.jpg")),
    ("name=a.jpg", dict(width=None, height=None, quality=80, format="jpeg", bg="ffffff")),
    ("name=a.jpg&width=100&dpr=2", dict(width=200, dpr=2.0)),
])
def test_parse_spec_accepts_good_queries(config, query, expected):
    spec = spec_for(config, query)
    assert {key: getattr(spec, key) for key in expected} == expected


@pytest.mark.parametrize("query, parameter", [
    ("name=a.jpg&width=0", "width"),
    ("name=a.jpg&width=-5", "width"),
    ("name=a.jpg&width=abc", "width"),
    ("name=a.jpg&width=4001", "width"),
    ("name=a.jpg&width=1.5", "width"),
    ("name=a.jpg&height=99999999999", "height"),
    ("name=a.jpg&width=", "width"),
    ("name=a.jpg&width=1&width=2", "width"),
    ("name=a.jpg&w=1&width=2", "width"),
    ("name=a.jpg&colour=red", "colour"),
    ("name=a.jpg&fit=squash", "fit"),
    ("name=a.jpg&fit=cover&gravity=up", "gravity"),
    ("name=a.jpg&forcefit=maybe", "forcefit"),
    ("name=a.jpg&forcefit=1&fit=cover", "forcefit"),
    ("name=a.jpg&quality=0", "quality"),
    ("name=a.jpg&q=101", "quality"),
    ("name=a.jpg&format=gif", "format"),
    ("name=a.jpg&bg=red", "bg"),
    ("name=a.jpg&upscale=2", "upscale"),
    ("name=a.jpg&dpr=9", "dpr"),
    ("name=a.jpg&dpr=nan", "dpr"),
    ("name=a.jpg&bandwidth=5g", "bandwidth"),
    ("name=a.jpg&screensize=huge", "screensize"),
    ("name=", "name"),
    ("", "name"),
    ("name=../etc/passwd", "name"),
    ("name=a/../../b.jpg", "name"),
    ("name=/etc/passwd", "name"),
    ("name=a%00.jpg", "name"),
    ("name=..%5c..%5cwin.ini", "name"),
    ("name=%ff%fe", "query"),
])
def test_parse_spec_refuses_bad_queries_naming_the_parameter(config, query, parameter):
    with pytest.raises(dynimg.BadRequest) as raised:
        spec_for(config, query)
    assert raised.value.message.startswith(parameter + ":")
    assert "\n" not in raised.value.message


def test_name_in_both_path_and_query_is_refused(config):
    with pytest.raises(dynimg.BadRequest, match="^name:"):
        spec_for(config, "name=b.jpg", path="/a.jpg")


def test_unknown_parameter_message_lists_what_is_accepted(config):
    with pytest.raises(dynimg.BadRequest) as raised:
        spec_for(config, "name=a.jpg&zoom=2")
    assert all(name in raised.value.message for name in dynimg.PARAMETERS)


def test_remote_url_is_refused_when_no_host_is_allowed(config):
    with pytest.raises(dynimg.Forbidden, match="^url:"):
        spec_for(config, "url=http://example.com/a.jpg")


#: A large opaque source: most boxes scale it down.
OPAQUE = dynimg.Facts(size=(4000, 3000), alpha=False)
#: The same with transparency (bg shows where the output format has no alpha).
TRANSPARENT = dynimg.Facts(size=(4000, 3000), alpha=True)
#: A source smaller than the box, so upscale decides the output.
SMALL = dynimg.Facts(size=(100, 50), alpha=False)


def identity_of(name, length=1000, mtime_ns=123456789):
    return (name, length, mtime_ns)


def key_of(config, query, facts=OPAQUE, identity=None, path="/"):
    """The image key of a request's answer from a source with these facts."""
    spec = spec_for(config, query, path=path)
    plan = dynimg.plan_output(facts, spec, config)
    return dynimg.image_key(spec, plan, identity or identity_of(spec.name))


@pytest.mark.parametrize("first, second", [
    ("name=a.jpg&width=340&height=400", "height=400&width=340&name=a.jpg"),
    ("name=a.jpg&width=340&height=400", "name=a.jpg&w=340&h=400"),
    ("name=a.jpg&forcefit=1&w=3&h=4", "name=a.jpg&fit=fill&w=3&h=4"),
    ("name=a.jpg&q=80", "name=a.jpg"),
    ("name=a.jpg&bg=fff", "name=a.jpg&bg=FFFFFF"),
    ("name=a.jpg&width=200", "name=a.jpg&width=100&dpr=2"),
    ("name=a.jpg&gravity=north", "name=a.jpg"),
])
def test_equivalent_requests_share_a_key(config, first, second):
    assert key_of(config, first) == key_of(config, second)


@pytest.mark.parametrize("first, second, facts", [
    # gravity only places the image for cover and pad
    ("name=a.jpg&width=340&height=400", "name=a.jpg&width=340&height=400&gravity=north", OPAQUE),
    # upscale changes nothing when the box is smaller than the source
    ("name=a.jpg&width=340&height=400", "name=a.jpg&width=340&height=400&upscale=1", OPAQUE),
    # a height that does not bind (the width decides a 4:3 source in 340x400)
    ("name=a.jpg&width=340", "name=a.jpg&width=340&height=400", OPAQUE),
    # bg shows nowhere on an opaque source
    ("name=a.jpg&width=340&height=400", "name=a.jpg&width=340&height=400&bg=000", OPAQUE),
    # a transparent source keeps its alpha in PNG: bg shows nowhere either
    ("name=a.jpg&width=340&format=png", "name=a.jpg&width=340&format=png&bg=000", TRANSPARENT),
    # a cover box of the source's own aspect crops nothing: gravity has nothing to choose
    ("name=a.jpg&width=400&height=300&fit=cover",
     "name=a.jpg&width=400&height=300&fit=cover&gravity=north", OPAQUE),
])
def test_requests_with_the_same_output_for_a_source_share_a_key(config, first, second, facts):
    assert key_of(config, first, facts) == key_of(config, second, facts)


def test_path_and_query_forms_share_a_key(config):
    by_query = spec_for(config, "name=a.jpg&width=340&height=400")
    by_path = spec_for(config, "width=340&height=400", path="/a.jpg")
    assert by_query == by_path
    assert (key_of(config, "name=a.jpg&width=340&height=400")
            == key_of(config, "width=340&height=400", path="/a.jpg"))


@pytest.mark.parametrize("other, facts", [
    ("name=a.jpg&width=341&height=400", OPAQUE),
    ("name=a.jpg&width=340&height=400&fit=cover", OPAQUE),
    ("name=a.jpg&width=340&height=400&fit=cover&gravity=north", OPAQUE),
    ("name=a.jpg&width=340&height=400&fit=pad", OPAQUE),
    ("name=a.jpg&width=340&height=400&q=79", OPAQUE),
    ("name=a.jpg&width=340&height=400&format=png", OPAQUE),
    ("name=a.jpg&width=340&height=400&format=webp", OPAQUE),
    ("name=a.jpg&width=340&height=400&bg=000", TRANSPARENT),  # flattened onto bg in JPEG
    ("name=a.jpg&width=340&height=400&upscale=1", SMALL),
    ("name=b.jpg&width=340&height=400", OPAQUE),
])
def test_different_requests_get_different_keys(config, other, facts):
    base = key_of(config, "name=a.jpg&width=340&height=400", facts)
    assert base != key_of(config, other, facts)


def test_pad_bg_changes_the_key_even_on_an_opaque_source(config):
    base = "name=a.jpg&width=340&height=400&fit=pad"
    assert key_of(config, base) != key_of(config, base + "&bg=000")


@pytest.mark.parametrize("identity", [identity_of("a.jpg", length=1001),
                                      identity_of("a.jpg", mtime_ns=123456790)])
def test_any_change_of_the_source_changes_the_key(config, identity):
    assert key_of(config, "name=a.jpg", identity=identity) != key_of(config, "name=a.jpg")


@pytest.mark.parametrize("header, etag, expected", [
    (None, '"abc"', False),
    ('"abc"', '"abc"', True),
    ('W/"abc"', '"abc"', True),
    ('"x", "abc"', '"abc"', True),
    ('"x", W/"y"', '"abc"', False),
    ("*", '"abc"', True),
    ("abc", '"abc"', False),
])
def test_if_none_match_compares_weakly(header, etag, expected):
    assert dynimg.is_not_modified(header, etag) is expected


#: Accept headers browsers send for <img> (their current releases), and old ones.
CHROME = "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"
FIREFOX = "image/avif,image/webp,image/png,image/svg+xml,image/*;q=0.8,*/*;q=0.5"
SAFARI = ("image/webp,image/avif,image/jxl,image/heic,image/heic-sequence,video/*;q=0.8,"
          "image/png,image/svg+xml,image/*;q=0.8,*/*;q=0.5")
SAFARI_13 = "image/png,image/svg+xml,image/*;q=0.8,video/*;q=0.8,*/*;q=0.5"
EDGE_18 = "image/png, image/svg+xml, image/*; q=0.8, */*; q=0.5"
CHROME_84 = "image/webp,image/apng,image/*,*/*;q=0.8"
ALL = ("avif", "webp", "jpeg")


@pytest.mark.parametrize("accept, preferred, expected", [
    (CHROME, ALL, "avif"),
    (FIREFOX, ALL, "avif"),
    (SAFARI, ALL, "avif"),  # the server's order decides among what the client takes
    (SAFARI_13, ALL, "jpeg"),  # image/* and */* take no new format
    (EDGE_18, ALL, "jpeg"),
    (CHROME_84, ALL, "webp"),
    ("", ALL, "jpeg"),
    ("*/*", ALL, "jpeg"),
    ("image/avif;q=0,image/webp", ALL, "webp"),
    ("image/avif; q=0.0, image/webp;q=0", ALL, "jpeg"),
    ("image/avif;q=0.1", ALL, "avif"),
    ("IMAGE/AVIF;Q=0.5", ALL, "avif"),
    ("image/avif;q=nan,image/webp", ALL, "webp"),  # an unreadable q counts as 0
    ("image/avif;q=0,image/avif", ALL, "jpeg"),  # the first mention counts
    (CHROME, ("webp", "avif", "jpeg"), "webp"),  # [output] auto_formats order
    (CHROME, ("jpeg",), "jpeg"),
    (CHROME, ("png", "jpeg"), "png"),
])
def test_format_negotiation_reads_accept(accept, preferred, expected):
    assert dynimg.negotiate_format(accept, preferred) == expected


def plan_for(size, query, config, alpha=False):
    spec = spec_for(config, "name=a.jpg&" + query)
    return dynimg.plan_output(dynimg.Facts(size=size, alpha=alpha), spec, config)


@pytest.mark.parametrize("size, query, resized, final", [
    ((4000, 2000), "width=340&height=400", (340, 170), (340, 170)),
    ((2000, 4000), "width=340&height=400", (200, 400), (200, 400)),
    ((100, 50), "width=340&height=400", (100, 50), (100, 50)),  # never upscaled by default
    ((100, 50), "width=340&height=400&upscale=1", (340, 170), (340, 170)),
    ((4000, 2000), "width=340&height=400&forcefit=1", (340, 400), (340, 400)),
    ((4000, 2000), "width=340&height=400&fit=pad", (340, 170), (340, 400)),
    ((4000, 2000), "width=500", (500, 250), (500, 250)),
    ((4000, 2000), "height=500", (1000, 500), (1000, 500)),
    ((4000, 2000), "", (4000, 2000), (4000, 2000)),
    ((940, 2), "width=100", (100, 1), (100, 1)),  # never 0 px
    # never larger than max_width x max_height (4000x4000), whatever upscale or aspect
    ((8000, 1000), "", (4000, 500), (4000, 500)),
    ((1000, 8000), "width=2000", (500, 4000), (500, 4000)),
    ((100, 50), "width=4000&upscale=1", (4000, 2000), (4000, 2000)),
    ((10, 1), "height=4000&upscale=1", (4000, 400), (4000, 400)),
    ((940, 2), "width=4000&height=4000&upscale=1", (4000, 9), (4000, 9)),
])
def test_output_geometry(config, size, query, resized, final):
    plan = plan_for(size, query, config)
    assert (plan.size, plan.canvas) == (resized, final)
    assert plan.source == size and plan.region == (0, 0) + size  # the whole source is shown
    assert max(plan.canvas[0], plan.size[0]) <= config.max_width
    assert max(plan.canvas[1], plan.size[1]) <= config.max_height


@pytest.mark.parametrize("size, query, final, region", [
    # cover resamples only the part of the source that fills the box
    ((4000, 2000), "width=340&height=400&fit=cover", (340, 400), (1150, 0, 2850, 2000)),
    ((4000, 2000), "width=340&height=400&fit=cover&gravity=west", (340, 400), (0, 0, 1700, 2000)),
    ((4000, 2000), "width=340&height=400&fit=cover&gravity=east", (340, 400),
     (2300, 0, 4000, 2000)),
    ((2000, 4000), "width=400&height=400&fit=cover&gravity=south", (400, 400),
     (0, 2000, 2000, 4000)),
    ((1, 1), "width=100&height=100&fit=cover", (1, 1), (0, 0, 1, 1)),
    # a 940x2 source filling 4000x4000 is not scaled whole (1,880,000 px wide) first
    ((940, 2), "width=4000&height=4000&fit=cover&upscale=1", (4000, 4000), (469, 0, 471, 2)),
])
def test_cover_geometry_crops_the_region_before_resampling(config, size, query, final, region):
    plan = plan_for(size, query, config)
    assert plan.size == plan.canvas == final
    assert plan.region == pytest.approx(region)
    assert plan.offset == (0, 0)


@pytest.mark.parametrize("query, offset", [
    ("width=340&height=400&fit=pad", (0, 115)),
    ("width=340&height=400&fit=pad&gravity=north", (0, 0)),
    ("width=340&height=400&fit=pad&gravity=south", (0, 230)),
])
def test_pad_places_the_image_by_gravity(config, query, offset):
    plan = plan_for((4000, 2000), query, config)
    assert (plan.size, plan.canvas, plan.offset) == ((340, 170), (340, 400), offset)
    assert plan.uses_bg


@pytest.mark.parametrize("query, alpha, output_format, keeps_alpha, uses_bg", [
    ("width=100", False, "jpeg", False, False),
    ("width=100", True, "jpeg", False, True),  # flattened onto bg
    ("width=100&format=webp", True, "webp", True, False),
    ("width=100&format=png", True, "png", True, False),
    ("width=100&format=auto", True, "png", True, False),  # no webp in Accept: PNG keeps alpha
    ("width=100&format=auto", False, "jpeg", False, False),
])
def test_plan_chooses_format_and_alpha(config, query, alpha, output_format, keeps_alpha,
                                       uses_bg):
    plan = plan_for((400, 200), query, config, alpha=alpha)
    assert (plan.format, plan.alpha, plan.uses_bg) == (output_format, keeps_alpha, uses_bg)


@pytest.mark.parametrize("name", [
    "../secret.jpg", "a/../../secret.jpg", "/etc/passwd", "a\\..\\b", "a\x00.jpg",
])
def test_check_name_refuses_traversal(name):
    with pytest.raises(dynimg.BadRequest):
        dynimg.check_name(name)


@pytest.mark.parametrize("name", [
    "a" * 256 + ".jpg",                       # one part over 255 bytes
    "é" * 128 + ".jpg",                       # 260 bytes in UTF-8, though 132 characters
    "/".join(["d" * 200] * 5) + "/" + "a" * 16 + ".jpg",  # 1025 bytes in all
])
def test_check_name_refuses_names_no_file_system_holds(name):
    with pytest.raises(dynimg.BadRequest, match="^name: too long"):
        dynimg.check_name(name)


def test_check_name_accepts_the_longest_names():
    part = "a" * 251 + ".jpg"
    assert dynimg.check_name(part) == part
    longest = "/".join(["d" * 200] * 5) + "/" + "a" * 15 + ".jpg"
    assert len(longest.encode()) == 1024
    assert dynimg.check_name(longest) == longest
    assert dynimg.check_name("./sub//a.jpg") == "sub/a.jpg"


def test_confine_refuses_symlinks_and_prefix_siblings(tmp_path):
    root = tmp_path / "images"
    sibling = tmp_path / "images-private"
    root.mkdir()
    sibling.mkdir()
    (sibling / "secret.jpg").write_bytes(b"x")
    (root / "link.jpg").symlink_to(sibling / "secret.jpg")
    (root / "linkdir").symlink_to(sibling)
    (root / "ok.jpg").write_bytes(b"x")
    real_root = os.path.realpath(root)
    assert dynimg.confine(real_root, "ok.jpg") == os.path.join(real_root, "ok.jpg")
    for name in ("link.jpg", "linkdir/secret.jpg", "../images-private/secret.jpg"):
        with pytest.raises(dynimg.NotFound):
            dynimg.confine(real_root, name)
