"""Layer 2: the WSGI app called directly, under wsgiref.validate, on corpus images."""

import json
import os
import logging

import pytest
from PIL import Image, ImageChops, ImageStat

import dynimg
from conftest import App, write_config


def test_contain_fits_the_box_without_aspect_loss(app):
    reply = app.request("/photo-large-1.jpg", "width=340&height=400")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "image/jpeg"
    image = reply.image()
    assert image.format == "JPEG" and image.mode == "RGB"
    assert image.size == (340, 191)  # 6028x3391 scaled by 340/6028


def test_query_form_and_path_form_give_the_same_bytes_and_key(app):
    by_query = app.request("/", "name=photo-medium-2.jpg&width=340&height=400")
    by_path = app.request("/photo-medium-2.jpg", "width=340&height=400")
    assert by_query.status == by_path.status == 200
    assert by_query.body == by_path.body
    assert by_query.headers["X-Image-Key"] == by_path.headers["X-Image-Key"]
    assert by_query.headers["ETag"] == f'"{by_query.headers["X-Image-Key"]}"'


def test_forcefit_stretches_to_the_exact_box(app):
    assert app.request("/photo-large-1.jpg", "width=340&height=400&forcefit=1").image().size \
        == (340, 400)


def test_cover_fills_the_box_and_crops_by_gravity(app, image_root):
    west = app.request("/photo-medium-2.jpg", "w=200&h=200&fit=cover&gravity=west").image()
    east = app.request("/photo-medium-2.jpg", "w=200&h=200&fit=cover&gravity=east").image()
    assert west.size == east.size == (200, 200)
    source = Image.open(os.path.join(image_root, "photo-medium-2.jpg"))
    source = source.convert("RGB").resize((320, 200))
    # the west crop matches the left of the scaled source, the east crop its right
    assert mean_difference(west, source.crop((0, 0, 200, 200))) < 8
    assert mean_difference(east, source.crop((120, 0, 320, 200))) < 8


def test_pad_letterboxes_on_bg(app):
    image = app.request("/photo-large-1.jpg", "w=300&h=300&fit=pad&bg=ff0000").image()
    assert image.size == (300, 300)
    top_left = image.getpixel((5, 5))
    assert top_left[0] > 230 and top_left[1] < 30 and top_left[2] < 30
    assert image.getpixel((150, 150)) != top_left


def test_never_upscaled_unless_asked(app):
    assert app.request("/tiny-1x1.png", "width=50").image().size == (1, 1)
    assert app.request("/tiny-1x1.png", "width=50&upscale=1").image().size == (50, 50)


def test_bare_name_returns_the_whole_image_re_encoded(app):
    reply = app.request("/photo-medium-1.jpg")
    assert reply.status == 200
    assert reply.image().size == (800, 533)


@pytest.mark.parametrize("name, query, size", [
    ("photo-medium-1.jpg", "", (300, 200)),                   # 800x533, no box
    ("photo-large-portrait.jpg", "", (200, 300)),
    ("tiny-1x1.png", "width=300&upscale=1", (300, 300)),
    ("tiny-1x1.png", "height=300&upscale=1", (300, 300)),
    ("photo-medium-1.jpg", "height=300&upscale=1", (300, 200)),  # the width limit binds
])
def test_the_output_never_exceeds_max_width_and_max_height(image_root, tmp_path, name, query,
                                                            size):
    small = App(dynimg.load_config(write_config(str(tmp_path), image_root, limits={
        "max_width": "300", "max_height": "300"})))
    reply = small.request("/" + name, query)
    assert reply.status == 200
    assert reply.image().size == size
    assert reply.headers["X-Image-Size"] == "{}x{}".format(*size)


@pytest.mark.parametrize("name, fmt, mime", [("webp", "WEBP", "image/webp"),
                                             ("png", "PNG", "image/png"),
                                             ("jpeg", "JPEG", "image/jpeg")])
def test_format_parameter_chooses_the_encoding(app, name, fmt, mime):
    reply = app.request("/photo-medium-1.jpg", f"width=200&format={name}")
    assert reply.headers["Content-Type"] == mime
    assert reply.image().format == fmt


def test_quality_changes_the_bytes(app):
    low = app.request("/photo-medium-2.jpg", "width=600&q=20")
    high = app.request("/photo-medium-2.jpg", "width=600&quality=95")
    assert len(low.body) < len(high.body) / 2
    assert low.headers["X-Image-Quality"] == "20"


def test_sub_folders_are_served(app):
    assert app.request("/sub/dir/photo-medium-1.jpg", "width=100").status == 200


def test_missing_source_gets_the_404_image_fitted_to_the_request(app):
    reply = app.request("/no-such-photo.jpg", "width=200&format=webp")
    assert reply.status == 404
    assert reply.headers["Content-Type"] == "image/webp"
    assert reply.image().width == 200
    assert reply.headers["Cache-Control"] == "public, max-age=60"


@pytest.mark.parametrize("query", ["width=abc", "bogus=1", "width=1&width=2", "height=",
                                   "width=5000"])
def test_bad_parameters_get_a_one_line_400(app, query):
    reply = app.request("/photo-medium-1.jpg", query)
    assert reply.status == 400
    assert reply.headers["Content-Type"].startswith("text/plain")
    assert reply.text.count("\n") == 1
    assert reply.text.split(":")[0] in query


def test_post_gets_405_with_allow(app):
    reply = app.request("/photo-medium-1.jpg", method="POST")
    assert reply.status == 405
    assert reply.headers["Allow"] == "GET, HEAD"
    assert reply.body == b""


def test_head_gets_headers_only(app):
    get = app.request("/photo-medium-1.jpg", "width=100")
    head = app.request("/photo-medium-1.jpg", "width=100", method="HEAD")
    assert head.status == 200 and head.body == b""
    assert head.headers["Content-Length"] == str(len(get.body))
    assert head.headers["ETag"] == get.headers["ETag"]


def test_if_none_match_gets_304_without_body(app):
    first = app.request("/photo-medium-1.jpg", "width=100")
    again = app.request("/photo-medium-1.jpg", "width=100",
                        headers={"If-None-Match": first.headers["ETag"]})
    assert again.status == 304 and again.body == b""
    assert "Content-Length" not in again.headers  # not the image's, and not 0
    assert again.headers["ETag"] == first.headers["ETag"]


@pytest.mark.parametrize("name, reason", [("not-image.jpg", "not an image"),
                                          ("truncated.jpg", "JPEG file this server cannot decode"),
                                          ("bomb.png", "max_source_pixels"),
                                          ("bomb.gif", "max_source_pixels")])
def test_undecodable_sources_get_422_with_the_error_image(app, name, reason):
    reply = app.request("/" + name, "width=100")
    assert reply.status == 422
    assert reason in reply.headers["X-Image-Error"]
    assert reply.image().width == 100


def test_unexpected_error_gets_500_with_error_image_and_traceback(app, monkeypatch, caplog):
    def broken(image, job):
        raise RuntimeError("a bug")
    with monkeypatch.context() as patch, caplog.at_level(logging.ERROR, logger="dynimg"):
        patch.setattr(dynimg, "PIPELINE", (broken,))
        patch.setattr(dynimg.log, "propagate", True)
        reply = app.request("/photo-medium-1.jpg", "width=101")
    assert reply.status == 500
    assert reply.headers["Content-Type"].startswith("image/")
    assert reply.headers["Cache-Control"] == "no-store"  # a passing failure is not replayed
    assert "RuntimeError: a bug" in caplog.text
    assert "a bug" not in reply.headers.get("X-Image-Error", "")
    assert app.request("/photo-medium-1.jpg", "width=101").status == 200


def test_health_reports_only_status_and_version_by_default(app):
    reply = app.request("/_health")
    assert reply.status == 200
    assert reply.headers["Cache-Control"] == "no-store"
    assert json.loads(reply.body) == {"status": "ok", "version": dynimg.VERSION,
                                      "avif": dynimg.AVIF_ENCODER is not None}


def test_health_reports_pillow_build_config_and_cache_with_details_on(tmp_path, image_root):
    app = App(dynimg.load_config(write_config(str(tmp_path), image_root,
                                              server={"health_details": "yes"})))
    assert app.request("/photo-medium-1.jpg", "width=100").status == 200
    reply = app.request("/_health")
    assert reply.status == 200
    health = json.loads(reply.body)
    assert health["status"] == "ok" and health["version"] == dynimg.VERSION
    assert health["pillow"]["version"] == Image.__version__
    assert isinstance(health["pillow"]["simd"], bool)
    assert health["config"].endswith("dynimg.ini")
    assert health["image_root"] == image_root
    assert "JPEG" in health["formats"]
    assert health["cache"]["misses"] == 1 and health["cache"]["hits"] == 0
    assert health["output_formats"] == list(dynimg.AVAILABLE_FORMATS)
    if dynimg.AVIF_ENCODER:
        assert health["avif"] is True
        assert health["avif_encoder"]["encoder"] == "svt"
        assert health["avif_encoder"]["libavif"].startswith("1.")
        assert "svt [enc]" in health["avif_encoder"]["codecs"]


def test_unknown_underscore_page_is_404(app):
    assert app.request("/_nothing").status == 404


def mean_difference(first, second):
    """Mean absolute difference of two images' grey levels (0 to 255)."""
    difference = ImageChops.difference(first.convert("L"), second.convert("L"))
    return ImageStat.Stat(difference).mean[0]
