"""Real-world inputs: every corpus photo and edge file, in every output format,
comes out upright, in sRGB, with transparency handled and no metadata."""

import io
import math
import os
import struct
import time
import zlib

import pytest
from PIL import Image, ImageChops, ImageCms, ImageFilter, ImageOps, ImageStat

import dynimg
from conftest import App, corpus_dir, read_manifest, write_config

#: Every output format this server can encode (AVIF where its plugin is installed,
#: which make does unless AVIF=no).
FORMATS = {name: dynimg.FORMATS[name][0] for name in dynimg.AVAILABLE_FORMATS}


def manifest_rows(*kinds):
    folder = corpus_dir()
    if not os.path.exists(os.path.join(folder, "MANIFEST.tsv")):
        return [pytest.param(None, marks=pytest.mark.skip(reason="corpus not found"))]
    return [row["file"] for row in read_manifest(folder) if row["kind"] in kinds]


def reference(path):
    """What a person should see: frame one, upright (exif_transpose), converted
    to sRGB by LittleCMS (profileToProfile), as RGB or RGBA."""
    image = Image.open(path)
    image.seek(0)
    icc = image.info.get("icc_profile")
    image = ImageOps.exif_transpose(image)
    if image.mode in ("P", "PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
    alpha = image.getchannel("A") if image.mode == "RGBA" else None
    base = image.convert("RGB") if alpha else image
    if icc:
        base = ImageCms.profileToProfile(base, ImageCms.ImageCmsProfile(io.BytesIO(icc)),
                                         ImageCms.createProfile("sRGB"), outputMode="RGB")
    base = base.convert("RGB")
    if alpha:
        base.putalpha(alpha)
    return base


def on_white(image):
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        flat = Image.new("RGB", image.size, "white")
        flat.paste(image, mask=image.getchannel("A"))
        return flat
    return image.convert("RGB")


def difference(first, second):
    """Mean absolute difference of two images, over R, G and B (0 to 255)."""
    first, second = on_white(first), on_white(second)
    if second.size != first.size:
        second = second.resize(first.size, Image.Resampling.LANCZOS)
    return sum(ImageStat.Stat(ImageChops.difference(first, second)).mean) / 3


def fitted(size, box):
    scale = min(1.0, box / size[0], box / size[1])
    return tuple(max(1, math.floor(side * scale + 0.5)) for side in size)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", manifest_rows("photo", "edge"))
def test_every_input_comes_out_upright_in_srgb_at_the_asked_size(app, corpus, name, fmt):
    expected = reference(os.path.join(corpus, name))
    reply = app.request("/" + name, f"width=200&height=200&format={fmt}")
    assert reply.status == 200, reply.headers.get("X-Image-Error")
    output = reply.image()
    assert output.format == FORMATS[fmt]
    assert output.size == fitted(expected.size, 200)
    assert difference(output, expected) < 8, "colours or orientation differ"


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", manifest_rows("photo", "edge"))
def test_no_metadata_leaks(app, corpus, name, fmt):
    output = app.request("/" + name, f"width=120&format={fmt}")
    image = output.image()
    assert not image.getexif(), "EXIF in the output"
    assert "icc_profile" not in image.info and "xmp" not in image.info
    for marker in (b"Exif\x00\x00", b"ns.adobe.com/xap", b"Hollero", b"Jolla", b"iCCP",
                   b"ICC_PROFILE"):
        assert marker not in output.body


@pytest.mark.parametrize("orientation", range(1, 9))
def test_all_eight_exif_orientations_show_the_same_upright_picture(app, orientation):
    upright = app.request("/exif-orient-1.jpg", "width=300").image()
    turned = app.request(f"/exif-orient-{orientation}.jpg", "width=300").image()
    assert turned.size == upright.size == (300, 200)
    assert difference(turned, upright) < 6


def test_width_and_height_refer_to_the_upright_image(app):
    assert app.request("/exif-orient-6.jpg", "width=300&height=300&fit=cover").image().size \
        == (300, 300)
    assert app.request("/exif-orient-6.jpg", "width=180").image().size == (180, 120)


@pytest.mark.parametrize("orientation", [0, 9, 65535])
def test_invalid_orientation_is_treated_as_upright(app, image_root, orientation):
    source = Image.open(os.path.join(image_root, "exif-orient-1.jpg"))
    exif = source.getexif()
    exif[dynimg.EXIF_ORIENTATION] = orientation
    name = f"orient-{orientation}.jpg"
    source.save(os.path.join(image_root, name), exif=exif.tobytes(), quality=90)
    os.chmod(os.path.join(image_root, name), 0o644)
    assert app.request("/" + name, "width=300").image().size == (300, 200)


@pytest.mark.parametrize("fmt", ["png", "webp"])
def test_png_and_webp_sources_with_exif_orientation_are_turned(app, image_root, fmt):
    source = Image.open(os.path.join(image_root, "exif-orient-6.jpg"))
    name = f"orient-6.{fmt}"
    source.save(os.path.join(image_root, name), exif=source.getexif().tobytes())
    os.chmod(os.path.join(image_root, name), 0o644)
    upright = app.request("/exif-orient-1.jpg", "width=300").image()
    turned = app.request("/" + name, "width=300").image()
    assert turned.size == (300, 200)
    assert difference(turned, upright) < 6


def test_a_png_orientation_after_its_pixels_is_ignored_as_browsers_do(app, image_root):
    """An eXIf chunk after IDAT (browsers read it only before) leaves the PNG as stored,
    and the plan and the pixels agree: nothing squashed or cropped from the wrong side."""
    source = Image.open(os.path.join(image_root, "exif-orient-1.jpg"))
    buffer = io.BytesIO()
    source.save(buffer, "PNG")
    exif = Image.Exif()
    exif[dynimg.EXIF_ORIENTATION] = 6
    payload = b"eXIf" + exif.tobytes()
    chunk = (struct.pack(">I", len(payload) - 4) + payload
             + struct.pack(">I", zlib.crc32(payload) & 0xFFFFFFFF))
    data = buffer.getvalue()
    end = data.rindex(b"IEND") - 4
    with open(os.path.join(image_root, "orient-6-late.png"), "wb") as file:
        file.write(data[:end] + chunk + data[end:])
    os.chmod(os.path.join(image_root, "orient-6-late.png"), 0o644)
    stored = app.request("/exif-orient-1.jpg", "width=300&height=300&fit=cover").image()
    late = app.request("/orient-6-late.png", "width=300&height=300&fit=cover").image()
    assert late.size == (300, 300)
    assert difference(late, stored) < 6


def mean_colour_shift(first, second):
    """The largest difference of the two images' mean R, G or B (0 to 255)."""
    first, second = ImageStat.Stat(on_white(first)).mean, ImageStat.Stat(on_white(second)).mean
    return max(abs(a - b) for a, b in zip(first, second))


@pytest.mark.parametrize("name", ["icc-adobergb.jpg", "icc-p3.png", "webp-alpha.webp"])
def test_icc_profiles_are_converted_to_srgb(app, corpus, name):
    path = os.path.join(corpus, name)
    output = app.request("/" + name, "width=400&format=png").image()
    unconverted = Image.open(path).convert("RGBA")
    assert mean_colour_shift(output, reference(path)) < 1.0
    if name == "icc-adobergb.jpg":
        # read as sRGB, Adobe RGB looks washed out: the conversion restores saturation
        expected = reference(path).resize(output.size, Image.Resampling.LANCZOS)
        unconverted = unconverted.resize(output.size, Image.Resampling.LANCZOS)
        assert abs(saturation(output) - saturation(expected)) < 0.5
        assert saturation(output) - saturation(unconverted) > 1.5


def saturation(image):
    return ImageStat.Stat(on_white(image).convert("HSV").getchannel("S")).mean[0]


def test_cmyk_without_a_profile_matches_the_rgb_original(app):
    cmyk = app.request("/cmyk.jpg", "width=400").image()
    rgb = app.request("/photo-medium-1.jpg", "width=400").image()
    assert cmyk.mode == "RGB"
    assert difference(cmyk, rgb) < 12


def test_one_transform_is_built_per_profile(app, monkeypatch):
    assert len(app.dynimg.transforms) == 0  # each app keeps its own
    built = []
    original = ImageCms.buildTransform
    monkeypatch.setattr(ImageCms, "buildTransform", lambda *a, **k: built.append(1) or
                        original(*a, **k))
    for width in (100, 150, 200):
        assert app.request("/icc-adobergb.jpg", f"width={width}").status == 200
    assert len(built) == 1
    assert len(app.dynimg.transforms) == 1


@pytest.mark.parametrize("fmt, mode", [("jpeg", "L"), ("png", "L"), ("webp", "RGB")])
def test_grayscale_stays_grayscale_where_the_format_allows(app, fmt, mode):
    image = app.request("/grayscale.jpg", f"width=200&format={fmt}").image()
    assert image.mode == mode


@pytest.mark.parametrize("name", ["png-alpha.png", "palette-trns.png", "webp-alpha.webp"])
def test_jpeg_output_puts_clear_pixels_on_bg(app, corpus, name):
    source = reference(os.path.join(corpus, name))
    output = app.request("/" + name, "bg=ff0000&format=jpeg").image()
    assert output.size == source.size and output.mode == "RGB"
    # pixels clear with all their neighbours (JPEG blurs colour edges)
    alpha = source.getchannel("A").filter(ImageFilter.MaxFilter(9))
    clear = [(x, y) for x in range(0, source.width, 2) for y in range(0, source.height, 2)
             if alpha.getpixel((x, y)) == 0]
    assert clear, "the source has clear pixels"
    for point in clear[:50]:
        red, green, blue = output.getpixel(point)
        assert red > 200 and green < 60 and blue < 60, point


@pytest.mark.parametrize("fmt", ["png", "webp"])
@pytest.mark.parametrize("name", ["png-alpha.png", "palette-trns.png", "webp-alpha.webp"])
def test_png_and_webp_keep_alpha(app, name, fmt):
    image = app.request("/" + name, f"width=150&format={fmt}").image()
    assert image.mode == "RGBA"
    assert image.getchannel("A").getextrema()[0] < 50


def test_resizing_with_alpha_leaves_no_dark_fringes(app, corpus):
    """Flattening first, then resizing, has no fringe problem: the server's
    resize of the RGBA image must match it."""
    source = reference(os.path.join(corpus, "png-alpha.png"))
    flat_first = on_white(source).resize((100, 75), Image.Resampling.LANCZOS)
    output = app.request("/png-alpha.png", "width=100&format=png").image()
    assert difference(output, flat_first) < 1.5


@pytest.mark.parametrize("name", ["anim.gif", "panorama.tif"])
def test_multi_frame_sources_serve_frame_one_and_say_so(app, name):
    reply = app.request("/" + name, "width=200")
    assert reply.status == 200
    assert reply.headers["X-Image-Frames"].startswith("first")


def test_broken_later_frames_still_serve_frame_one(app, image_root):
    with open(os.path.join(image_root, "anim.gif"), "rb") as source:
        data = source.read()
    path = os.path.join(image_root, "anim-cut.gif")
    with open(path, "wb") as cut:
        cut.write(data[:len(data) // 3])  # frame one whole, later frames cut off
    os.chmod(path, 0o644)
    reply = app.request("/anim-cut.gif", "width=200")
    assert reply.status == 200
    whole = app.request("/anim.gif", "width=200").image()
    assert difference(reply.image(), whole) < 3


def test_format_is_sniffed_from_content_not_the_extension(app):
    reply = app.request("/jpeg-named.png", "width=100&format=png")
    assert reply.status == 200 and reply.image().format == "PNG"


@pytest.mark.parametrize("size, query, expected", [
    ((1, 1), "width=100", (1, 1)),
    ((2, 1), "width=100&upscale=1", (100, 50)),
    ((940, 2), "width=100", (100, 1)),
    ((940, 2), "width=100&height=100&fit=cover", (100, 2)),
    ((20, 20), "width=7&height=3&fit=pad", (7, 3)),
    ((20, 20), "width=1&height=1", (1, 1)),
    ((2, 1), "width=1&height=1&fit=cover", (1, 1)),
])
@pytest.mark.parametrize("fmt", FORMATS)
def test_tiny_and_extreme_shapes_give_at_least_one_pixel(app, size, query, expected, fmt):
    request = dynimg.Request(path="/x.png", query=f"{query}&format={fmt}")
    spec = dynimg.parse_spec(request, app.config)
    buffer = io.BytesIO()
    Image.new("RGB", size, "#3366cc").save(buffer, "PNG")
    rendered = dynimg.render(buffer.getvalue(), spec, app.config, app.dynimg.transforms)
    assert Image.open(io.BytesIO(rendered.data)).size == expected


AVIF = pytest.mark.skipif(not dynimg.AVIF_ENCODER, reason="AVIF plugin not installed (AVIF=no)")


@pytest.mark.parametrize("accept, source, expected", [
    ("image/webp,*/*", "photo-medium-1.jpg", "image/webp"),
    ("image/png,*/*;q=0.8", "photo-medium-1.jpg", "image/jpeg"),
    ("*/*", "png-alpha.png", "image/png"),
    ("image/webp", "png-alpha.png", "image/webp"),
    pytest.param("image/avif,image/webp,*/*", "photo-medium-1.jpg", "image/avif", marks=AVIF),
    pytest.param("image/avif,image/webp,*/*", "png-alpha.png", "image/avif", marks=AVIF),
    pytest.param("image/avif;q=0,image/webp", "photo-medium-1.jpg", "image/webp", marks=AVIF),
])
def test_format_auto_negotiates_with_accept(app, accept, source, expected):
    reply = app.request("/" + source, "width=100&format=auto", headers={"Accept": accept})
    assert reply.headers["Content-Type"] == expected
    assert "Accept" in reply.headers["Vary"]
    assert reply.image().format == expected.split("/")[1].upper()


def test_copyright_line_is_kept_only_when_the_config_says(app):
    plain = app.request("/photo-medium-1.jpg", "width=100").image()
    assert not plain.getexif()
    keeping = App(dynimg.dataclasses.replace(app.config, keep_copyright=True))
    for fmt in FORMATS:
        kept = keeping.request("/photo-medium-1.jpg", f"width=100&format={fmt}")
        exif = kept.image().getexif()
        assert exif.get(dynimg.EXIF_COPYRIGHT, "").startswith("Myleen Hollero")
        assert set(exif) == {dynimg.EXIF_COPYRIGHT}
        assert b"ns.adobe.com/xap" not in kept.body


def test_png_palette_switch_quantizes(app):
    assert app.request("/png-alpha.png", "width=150&format=png").image().mode == "RGBA"
    palette = App(dynimg.dataclasses.replace(app.config, png_palette=True))
    image = palette.request("/png-alpha.png", "width=150&format=png").image()
    assert image.mode == "P"


@pytest.mark.parametrize("name, fmt", [("photo.pcx", "PCX"), ("photo.ico", "ICO"),
                                       ("photo.tga", "TGA")])
def test_formats_outside_the_configured_decoders_answer_422(app, image_root, name, fmt):
    """Pillow reads these, but no decoder outside [limits] formats is handed a source."""
    photo = Image.open(os.path.join(image_root, "photo-medium-1.jpg")).convert("RGB")
    derived(image_root, name, photo.resize((64, 43)), fmt)
    assert Image.open(os.path.join(image_root, name)).format == fmt
    reply = app.request("/" + name, "width=32")
    assert reply.status == 422
    assert reply.headers["X-Image-Error"].startswith(
        "source is not an image in a format this server reads: ")


def test_limits_formats_narrows_the_decoders(app, image_root, tmp_path):
    only_jpeg = App(dynimg.load_config(write_config(str(tmp_path / "jpeg-only"), image_root,
                                                    limits={"formats": "jpeg"})))
    assert app.request("/photo-medium.png", "width=100").status == 200
    refused = only_jpeg.request("/photo-medium.png", "width=100")
    assert refused.status == 422
    assert refused.headers["X-Image-Error"] == (
        "source is not an image in a format this server reads: jpeg")
    assert only_jpeg.request("/photo-medium-1.jpg", "width=100").status == 200


@pytest.mark.parametrize("name", manifest_rows("bad"))
def test_bad_files_answer_422_in_bounded_time(app, name):
    started = time.monotonic()
    reply = app.request("/" + name, "width=200")
    assert time.monotonic() - started < 10
    assert reply.status == 422
    assert reply.headers["X-Image-Error"]


# --- formats and profiles the corpus has no file for, made from its photos --------

PROPHOTO = "/usr/share/color/icc/colord/ProPhotoRGB.icc"
GREY = "/usr/share/color/icc/Gray.icc"


def derived(image_root, name, image, fmt, **options):
    """Save a variant of a corpus photo into the test image root."""
    path = os.path.join(image_root, name)
    image.save(path, fmt, **options)
    os.chmod(path, 0o644)
    return path


def needs(path):
    if not os.path.exists(path):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing (make test installs it)")
        pytest.skip(f"{path} is missing (make test installs it)")
    with open(path, "rb") as profile:
        return profile.read()


def test_prophoto_profile_is_converted(app, image_root):
    profile = needs(PROPHOTO)
    photo = Image.open(os.path.join(image_root, "photo-medium-2.jpg"))
    path = derived(image_root, "prophoto.jpg", photo, "JPEG", quality=95, icc_profile=profile)
    output = app.request("/prophoto.jpg", "width=400&format=png").image()
    expected = reference(path).resize(output.size, Image.Resampling.LANCZOS)
    ignored = Image.open(path).convert("RGB").resize(output.size, Image.Resampling.LANCZOS)
    assert abs(saturation(output) - saturation(expected)) < 0.5
    assert saturation(output) - saturation(ignored) > 3


def test_grey_profile_is_converted_and_stays_grey(app, image_root):
    profile = needs(GREY)
    photo = Image.open(os.path.join(image_root, "grayscale.jpg"))
    path = derived(image_root, "grey-icc.jpg", photo, "JPEG", quality=95, icc_profile=profile)
    output = app.request("/grey-icc.jpg", "width=300").image()
    assert output.mode == "L"
    expected = reference(path).convert("L").resize(output.size, Image.Resampling.LANCZOS)
    assert difference(output, expected) < 3


@pytest.mark.parametrize("name, fmt, options", [
    ("photo.jp2", "JPEG2000", {}),
    ("photo-lzw.tif", "TIFF", {"compression": "tiff_lzw"}),
    ("photo-jpeg.tif", "TIFF", {"compression": "jpeg"}),
    ("photo.bmp", "BMP", {}),
])
def test_other_formats_decode(app, image_root, name, fmt, options):
    photo = Image.open(os.path.join(image_root, "photo-medium-1.jpg")).convert("RGB")
    derived(image_root, name, photo, fmt, **options)
    output = app.request("/" + name, "width=300").image()
    assert output.size == (300, 200)
    assert difference(output, photo) < 8


def test_fax_tiff_decodes_to_grey(app, image_root):
    fax = Image.open(os.path.join(image_root, "grayscale.jpg")).convert("1")
    derived(image_root, "fax.tif", fax, "TIFF", compression="group4")
    output = app.request("/fax.tif", "width=400&format=png").image()
    assert output.mode == "L" and output.size == (400, 267)


@pytest.mark.parametrize("name, fmt", [("anim.png", "PNG"), ("anim.webp", "WEBP")])
def test_animated_png_and_webp_serve_frame_one(app, image_root, name, fmt):
    gif = Image.open(os.path.join(image_root, "anim.gif"))
    frames = []
    for index in range(3):
        gif.seek(index)
        frames.append(gif.convert("RGBA"))
    derived(image_root, name, frames[0], fmt, save_all=True, append_images=frames[1:],
            duration=100, loop=0)
    reply = app.request("/" + name, "width=200&format=png")
    assert reply.status == 200
    assert reply.headers["X-Image-Frames"].startswith("first")
    assert difference(reply.image(), frames[0].resize((200, 200))) < 4


def test_16_bit_grey_is_scaled_and_its_trns_becomes_alpha(app, image_root):
    grey = Image.open(os.path.join(image_root, "grayscale.jpg")).convert("L")
    wide = grey.convert("I").point(lambda value: value * 257)  # 8 -> 16 bits
    wide.paste(1234, (0, 0, 100, 100))
    path = derived(image_root, "grey16-trns.png", wide.convert("I;16"), "PNG", transparency=1234)
    assert Image.open(path).mode.startswith("I")
    output = app.request("/grey16-trns.png", "format=png").image()
    assert output.mode == "LA"
    assert output.getpixel((50, 50))[1] == 0 and output.getpixel((400, 400))[1] == 255
    assert abs(output.getpixel((400, 400))[0] - grey.getpixel((400, 400))) <= 1


CMYK_PROFILE = "/usr/share/color/icc/ghostscript/default_cmyk.icc"


def test_cmyk_profile_is_converted(app, image_root):
    profile = needs(CMYK_PROFILE)
    cmyk = Image.open(os.path.join(image_root, "cmyk.jpg"))
    assert cmyk.mode == "CMYK"
    path = derived(image_root, "cmyk-icc.jpg", cmyk, "JPEG", quality=95, icc_profile=profile)
    output = app.request("/cmyk-icc.jpg", "width=400&format=png").image()
    assert output.mode == "RGB"
    expected = reference(path).resize(output.size, Image.Resampling.LANCZOS)
    naive = Image.open(path).convert("RGB").resize(output.size, Image.Resampling.LANCZOS)
    assert difference(output, expected) < 2
    assert difference(output, naive) > 2 * difference(output, expected)
