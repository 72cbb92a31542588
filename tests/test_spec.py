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
    return dynimg.parse_spec(environ, config)


@pytest.mark.parametrize("query, expected", [
    ("name=a.jpg&width=340&height=400", dict(name="a.jpg", width=340, height=400, fit="contain")),
    ("name=a.jpg&w=340&h=400", dict(width=340, height=400)),
    ("name=a.jpg&forcefit=1&width=10&height=20", dict(fit="fill")),
    ("name=a.jpg&forcefit=no", dict(fit="contain")),
    ("name=a.jpg&fit=cover&gravity=north", dict(fit="cover", gravity="north")),
    ("name=a.jpg&gravity=north", dict(gravity="center")),  # gravity only matters for cover/pad
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


IDENTITY = ("a.jpg", 1000, 123456789)


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
    assert spec_for(config, first).key(IDENTITY) == spec_for(config, second).key(IDENTITY)


def test_path_and_query_forms_share_a_key(config):
    by_query = spec_for(config, "name=a.jpg&width=340&height=400")
    by_path = spec_for(config, "width=340&height=400", path="/a.jpg")
    assert by_query == by_path
    assert by_query.key(IDENTITY) == by_path.key(IDENTITY)


@pytest.mark.parametrize("other", [
    "name=a.jpg&width=341&height=400", "name=a.jpg&width=340&height=400&fit=cover",
    "name=a.jpg&width=340&height=400&q=79", "name=a.jpg&width=340&height=400&format=png",
    "name=a.jpg&width=340&height=400&bg=000", "name=a.jpg&width=340&height=400&upscale=1",
    "name=b.jpg&width=340&height=400",
])
def test_different_requests_get_different_keys(config, other):
    base = spec_for(config, "name=a.jpg&width=340&height=400")
    assert base.key(IDENTITY) != spec_for(config, other).key(IDENTITY)


@pytest.mark.parametrize("identity", [("a.jpg", 1001, 123456789), ("a.jpg", 1000, 123456790)])
def test_any_change_of_the_source_changes_the_key(config, identity):
    spec = spec_for(config, "name=a.jpg")
    assert spec.key(identity) != spec.key(IDENTITY)


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


@pytest.mark.parametrize("accept, expected", [
    ("image/avif,image/webp,image/apng,image/*,*/*;q=0.8", True),
    ("image/webp;q=0", False),
    ("image/png,image/*;q=0.8", False),
    ("", False),
    ("IMAGE/WEBP", True),
])
def test_webp_negotiation_reads_accept(accept, expected):
    assert dynimg.negotiate_webp(accept) is expected


def geometry(size, query, config):
    return dynimg.output_geometry(size, spec_for(config, "name=a.jpg&" + query))


@pytest.mark.parametrize("size, query, resized, final", [
    ((4000, 2000), "width=340&height=400", (340, 170), (340, 170)),
    ((2000, 4000), "width=340&height=400", (200, 400), (200, 400)),
    ((100, 50), "width=340&height=400", (100, 50), (100, 50)),  # never upscaled by default
    ((100, 50), "width=340&height=400&upscale=1", (340, 170), (340, 170)),
    ((4000, 2000), "width=340&height=400&forcefit=1", (340, 400), (340, 400)),
    ((4000, 2000), "width=340&height=400&fit=cover", (800, 400), (340, 400)),
    ((4000, 2000), "width=340&height=400&fit=pad", (340, 170), (340, 400)),
    ((4000, 2000), "width=500", (500, 250), (500, 250)),
    ((4000, 2000), "height=500", (1000, 500), (1000, 500)),
    ((4000, 2000), "", (4000, 2000), (4000, 2000)),
    ((940, 2), "width=100", (100, 1), (100, 1)),  # never 0 px
    ((1, 1), "width=100&height=100&fit=cover", (1, 1), (1, 1)),
])
def test_output_geometry(config, size, query, resized, final):
    assert geometry(size, query, config) == (resized, final)


@pytest.mark.parametrize("name", [
    "../secret.jpg", "a/../../secret.jpg", "/etc/passwd", "a\\..\\b", "a\x00.jpg",
])
def test_check_name_refuses_traversal(name):
    with pytest.raises(dynimg.BadRequest):
        dynimg._check_name(name)


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
