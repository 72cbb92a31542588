"""What a site's pages use: placeholders, the <img> markup (/_html and `dynimg.py
html`), the command line as a person runs it, and the README's own examples."""

import base64
import io
import os
import re
import shutil
import subprocess
import urllib.parse

import pytest
from PIL import Image, ImageStat

import dynimg
from conftest import IS_ROOT, PROJECT, VENV_BIN, App, shared_tempdir, write_config

#: The corpus's photos, in every shape it has (landscape, portrait, phone, PNG).
PHOTOS = ("photo-large-1.jpg", "photo-large-2.jpg", "photo-large-3.jpg",
          "photo-large-portrait.jpg", "photo-medium-1.jpg", "photo-medium-2.jpg",
          "photo-medium.png", "photo-phone.jpg", "progressive.jpg", "icc-adobergb.jpg",
          "exif-orient-6.jpg", "grayscale.jpg", "cmyk.jpg")

WEBP_CLIENT = {"Accept": "image/avif,image/webp,image/apng,*/*;q=0.8"}


# --- placeholders ----------------------------------------------------------------


@pytest.mark.parametrize("name", PHOTOS)
def test_a_placeholder_is_the_same_framing_in_a_few_hundred_bytes(app, name):
    full = app.request("/" + name, "width=640&height=400&fit=cover")
    placeholder = app.request("/" + name, "width=640&height=400&fit=cover&placeholder=1"
                              "&format=auto", headers=WEBP_CLIENT)
    assert placeholder.status == 200
    # an AVIF client too gets WebP: AVIF's container alone is larger than the budget
    assert placeholder.headers["Content-Type"] == "image/webp"
    assert len(placeholder.body) <= 300
    small, large = placeholder.image(), full.image()
    assert max(small.size) == dynimg.PLACEHOLDER_SIDE
    assert abs(small.width / small.height - large.width / large.height) < 0.1
    # its colours are the picture's: the mean of each channel within a few levels
    reduced = large.convert("RGB").resize(small.size, Image.BOX)
    for got, expected in zip(mean_rgb(small), mean_rgb(reduced)):
        assert abs(got - expected) < 12


def mean_rgb(image):
    return ImageStat.Stat(image.convert("RGB")).mean


def test_a_placeholder_ignores_the_hints_and_is_cached_like_any_image(app):
    plain = app.request("/photo-large-2.jpg", "width=800&placeholder=1&format=auto",
                        headers=WEBP_CLIENT)
    hinted = app.request("/photo-large-2.jpg", "width=800&placeholder=1&format=auto",
                         headers={**WEBP_CLIENT, "ECT": "2g", "Sec-CH-DPR": "3",
                                  "Save-Data": "on", "Sec-CH-Viewport-Width": "390"})
    assert hinted.headers["X-Image-Key"] == plain.headers["X-Image-Key"]
    assert hinted.headers["Server-Timing"] == "cache;desc=hit"
    assert plain.headers["Vary"] == "Accept"
    jpeg = app.request("/photo-large-2.jpg", "width=800&placeholder=1")
    assert jpeg.headers["Content-Type"] == "image/jpeg" and "Vary" not in jpeg.headers
    assert len(jpeg.body) <= 450  # JPEG's own tables are ~300 bytes of it
    full = app.request("/photo-large-2.jpg", "width=800")
    assert full.headers["X-Image-Key"] != jpeg.headers["X-Image-Key"]
    assert app.dynimg.cache.counts["misses"] == 3


def test_a_placeholder_of_a_transparent_source_and_of_a_missing_one(app):
    alpha = app.request("/png-alpha.png", "width=300&placeholder=1")
    assert alpha.status == 200 and alpha.headers["Content-Type"] == "image/jpeg"
    # flattened onto bg in every format: alpha would cost more than the picture
    webp = app.request("/png-alpha.png", "width=300&placeholder=1&format=webp&bg=000")
    assert webp.image().mode == "RGB" and len(webp.body) <= 300
    missing = app.request("/no-such.jpg", "width=300&placeholder=1")
    assert missing.status == 404 and max(missing.image().size) == dynimg.PLACEHOLDER_SIDE


def corpus_names():
    folder = os.environ.get("DYNIMG_CORPUS", os.path.join(PROJECT, "..", "shared", "corpus"))
    return sorted(name for name in os.listdir(folder) if not name.endswith((".tsv", ".md"))) \
        if os.path.isdir(folder) else []


@pytest.mark.parametrize("name", corpus_names())
def test_every_corpus_file_gives_a_placeholder_and_markup_or_a_clear_refusal(app, name):
    query = "format=auto&fit=cover&width=300&height=200"
    placeholder = app.request("/" + name, "placeholder=1&" + query, headers=WEBP_CLIENT)
    assert placeholder.status in (200, 422), placeholder.status
    if placeholder.status == 200:
        # the answer's own framing (a small source is not upscaled), at most 24 px long
        full = app.request("/" + name, query, headers=WEBP_CLIENT).image().size
        scale = min(1, dynimg.PLACEHOLDER_SIDE / max(full))
        expected = tuple(max(1, round(side * scale)) for side in full)
        assert len(placeholder.body) <= 300 and placeholder.image().size == expected
    markup = app.request("/_html", "name=" + urllib.parse.quote(name))
    assert markup.status == placeholder.status
    assert markup.headers["Content-Type"] == "text/plain; charset=utf-8"


@pytest.mark.parametrize("query", ["placeholder=maybe", "placeholder=", "placeholder=1&placeholder=0"])
def test_a_bad_placeholder_value_is_a_400_naming_it(app, query):
    reply = app.request("/photo-medium-1.jpg", query)
    assert reply.status == 400 and reply.text.startswith("placeholder:")


# --- the markup ------------------------------------------------------------------


def markup_of(app, query):
    reply = app.request("/_html", query)
    assert reply.status == 200, reply.body[:200]
    assert reply.headers["Content-Type"] == "text/plain; charset=utf-8"
    return reply.text


def attribute(markup, name):
    return re.search(rf'\n  {name}="([^"]*)"|<img {name}="([^"]*)"| {name}="([^"]*)"',
                     markup).group(0).split('="', 1)[1].rstrip('"')


def test_html_gives_a_ready_img_for_a_source(app, image_root):
    text = markup_of(app, "name=photo-medium-1.jpg&alt=A+%3Cb%3Eharbour%3C/b%3E"
                          "&sizes=(max-width:+600px)+100vw,+600px")
    source = Image.open(os.path.join(image_root, "photo-medium-1.jpg"))
    widths = [int(width) for width in re.findall(r" (\d+)w\b", text)]
    steps = app.config.width_steps
    # the ladder up to the source's own width, which ends it
    assert widths == [step for step in steps if step < source.width] + [source.width]
    for url in re.findall(r"(/images/\S+) \d+w", text):
        assert url.startswith("/images/photo-medium-1.jpg?width=")
        assert url.endswith("&amp;dpr=1&amp;format=auto")
    width, height = int(attribute(text, "width")), int(attribute(text, "height"))
    assert width == 600 and abs(height - 600 * source.height / source.width) <= 1
    assert 'alt="A &lt;b&gt;harbour&lt;/b&gt;"' in text
    assert 'sizes="(max-width: 600px) 100vw, 600px"' in text
    assert 'loading="lazy"' in text and 'decoding="async"' in text
    assert "Accept-CH: ECT, Downlink, Save-Data, Sec-CH-DPR" in text
    assert "Permissions-Policy: ch-ect=" in text and "Delegate-CH" in text
    # the inlined placeholder is a WebP of the same aspect, in a few hundred bytes
    inline = base64.b64decode(re.search(r"data:image/webp;base64,([A-Za-z0-9+/=]+)",
                                        text).group(1))
    assert len(inline) <= 300
    placeholder = Image.open(io.BytesIO(inline))
    assert placeholder.format == "WEBP"
    assert abs(placeholder.width / placeholder.height - source.width / source.height) < 0.1


def test_html_for_a_source_wider_than_any_output_stops_at_max_width(app):
    text = markup_of(app, "name=photo-large-1.jpg")
    widths = [int(width) for width in re.findall(r" (\d+)w\b", text)]
    assert widths[-1] == app.config.max_width and widths == sorted(set(widths))
    assert 'sizes="(max-width: 640px) 100vw, 640px"' in text and 'width="640"' in text


@pytest.mark.parametrize("query, status, says", [
    ("", 400, "name: required"),
    ("name=../etc/passwd", 400, "name:"),
    ("name=photo-medium-1.jpg&width=300", 400, "width: unknown parameter"),
    ("name=photo-medium-1.jpg&alt=a&alt=b", 400, "alt: given more than once"),
    ("name=photo-medium-1.jpg&sizes=" + "9" * 1001, 400, "sizes: at most 1000"),
    ("name=no-such.jpg", 404, "no such image"),
    ("name=truncated.jpg", 422, ""),
    ("name=not-image.jpg", 422, ""),
])
def test_html_refuses_what_it_cannot_use_in_a_line_of_text(app, query, status, says):
    reply = app.request("/_html", query)
    assert reply.status == status
    assert reply.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert says in reply.text and "\n" == reply.text[-1] and reply.text.count("\n") == 1


def test_html_is_off_while_urls_must_be_signed(tmp_path, image_root):
    signed = App(dynimg.load_config(write_config(str(tmp_path), image_root,
                                                 security={"signing_key": "k1"})))
    assert signed.request("/_html", "name=photo-medium-1.jpg").status == 403


def dynimg_command(*args, config=None, user=None):
    command = [os.path.join(VENV_BIN, "python"), os.path.join(PROJECT, "dynimg.py")]
    if config:
        command += ["--config", config]
    if user:
        command = ["runuser", "-u", user, "--"] + command
    return subprocess.run(command + list(args), capture_output=True, text=True, timeout=120)


def test_html_command_prints_the_same_markup_and_signs_it(tmp_path, image_root):
    config = write_config(str(tmp_path), image_root, security={"signing_key": "k1 k0"})
    result = dynimg_command("html", "photo-medium-2.jpg", "--alt", "Boats",
                            "--base", "https://img.example.com/images/", config=config)
    assert result.returncode == 0, result.stderr
    assert 'alt="Boats"' in result.stdout
    assert 'ch-dpr=("https://img.example.com")' in result.stdout
    urls = re.findall(r"(https://img\.example\.com/images/\S+) \d+w", result.stdout)
    assert urls
    app = App(dynimg.load_config(config))
    for url in urls[:3] + urls[-1:]:
        parts = urllib.parse.urlsplit(url.replace("&amp;", "&"))
        reply = app.request(parts.path.removeprefix("/images"), parts.query)
        assert reply.status == 200 and reply.headers["Content-Type"] == "image/jpeg"
    missing = dynimg_command("html", "samples/sunset.jpg", config=config)
    assert missing.returncode == 1 and "under " + image_root in missing.stderr


# --- the command line ------------------------------------------------------------


def test_render_takes_a_file_path_or_a_name_and_says_which_is_missing(tmp_path, image_root):
    config = write_config(str(tmp_path), image_root)
    output = str(tmp_path / "out.webp")
    by_path = dynimg_command("render", os.path.join(PROJECT, "samples", "wine.jpg"),
                             "--width", "120", "--format", "webp", "-o", output, config=config)
    assert by_path.returncode == 0, by_path.stderr
    assert Image.open(output).size[0] == 120
    by_name = dynimg_command("render", "photo-medium-1.jpg", "--placeholder", "-o", output,
                             config=config)
    assert by_name.returncode == 0 and max(Image.open(output).size) == 24
    missing = dynimg_command("render", "samples/nothing.jpg", "-o", output, config=config)
    assert missing.returncode == 1
    assert "neither a file nor a name under " + image_root in missing.stderr


@pytest.mark.parametrize("given, accepted", [
    ("/images/sunset.jpg?width=300", True),
    ("http://127.0.0.1:8000/images/sunset.jpg?width=300&format=webp", True),
    ("https://img.example.com/images/?name=sunset.jpg&width=300", True),
    ("/images/sunset.jpg", True),
    ("sunset.jpg?width=300", False),
    ("/sunset.jpg?width=300", False),
    ("/images/sunset.jpg?width=300&sig=00", False),
])
def test_sign_takes_a_url_or_its_path_and_says_what_it_needs(tmp_path, given, accepted):
    config = write_config(str(tmp_path), os.path.join(PROJECT, "samples"),
                          security={"signing_key": "s3cret"})
    result = dynimg_command("sign", given, config=config)
    if not accepted:
        assert result.returncode == 2 and result.stdout == ""
        assert "/images/sunset.jpg?width=300" in result.stderr or "sig=" in result.stderr
        return
    assert result.returncode == 0, result.stderr
    signed = urllib.parse.urlsplit(result.stdout.strip())
    app = App(dynimg.load_config(config))
    reply = app.request(signed.path.removeprefix("/images"), signed.query)
    assert reply.status == 200


def test_a_trim_that_cannot_take_its_lock_says_so(tmp_path, image_root):
    config = write_config(str(tmp_path), image_root)
    os.makedirs(tmp_path / "cache" / ".locks" / "prune")  # a lock file that cannot be
    result = dynimg_command("cache", "prune", config=config)
    assert result.returncode == 1 and "cannot trim the result cache" in result.stderr


def test_cache_failures_are_logged_once_per_cause(app, monkeypatch, caplog):
    import errno

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(dynimg.tempfile, "mkstemp", refuse)
    with caplog.at_level("WARNING", logger="dynimg"):
        for width in (101, 102, 103):
            assert app.request("/photo-medium-1.jpg", f"width={width}").status == 200
    assert caplog.text.count("result cache write failed") == 1


@pytest.mark.skipif(not IS_ROOT, reason="what root leaves behind: run as root")
def test_as_root_cache_commands_act_as_the_cache_owner_or_refuse(image_root):
    folder = shared_tempdir("dynimg-root-")
    try:
        _check_root_commands(folder, image_root)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _check_root_commands(folder, image_root):
    config = write_config(folder, image_root)
    cache = os.path.join(folder, "cache")
    os.chown(cache, *_www_data())
    App(dynimg.load_config(config)).request("/photo-medium-1.jpg", "width=90")  # an entry
    subprocess.run(["chown", "-R", "www-data:www-data", cache], check=True)
    for args in (("cache", "prune"), ("cache", "stats"), ("html", "photo-medium-2.jpg")):
        result = dynimg_command(*args, config=config)
        assert result.returncode == 0, result.stderr
    owners = {os.stat(os.path.join(folder, name)).st_uid
              for folder, folders, names in os.walk(cache) for name in names + folders}
    assert owners == {_www_data()[0]}, "root left files of its own in the cache"
    # without the folder, root cannot know whose it should be: it refuses, saying how
    nowhere = os.path.join(folder, "nowhere")
    os.makedirs(os.path.join(folder, "other"))
    missing = write_config(os.path.join(folder, "other"), image_root,
                           cache={"cache_dir": nowhere})
    refused = dynimg_command("cache", "prune", config=missing)
    assert refused.returncode == 2 and "runuser -u www-data --" in refused.stderr
    assert not os.path.exists(nowhere)


@pytest.mark.skipif(not IS_ROOT, reason="needs root to make a file another user locks")
def test_a_lock_file_root_made_still_locks_for_the_server():
    folder = shared_tempdir("dynimg-locks-")
    path = os.path.join(folder, "abc")
    open(path, "w").close()  # root's, 0644, as a command run as root once left it
    script = ("import sys; sys.path.insert(0, sys.argv[1]); import dynimg\n"
              "with dynimg._StripeLock(sys.argv[2], 0) as locked: print(locked)")
    result = subprocess.run(["runuser", "-u", "www-data", "--", os.path.join(VENV_BIN, "python"),
                             "-c", script, PROJECT, path], capture_output=True, text=True)
    shutil.rmtree(folder, ignore_errors=True)
    assert result.stdout.strip() == "True", result.stderr


def _www_data():
    import pwd
    entry = pwd.getpwnam("www-data")
    return entry.pw_uid, entry.pw_gid


# --- the README's examples -------------------------------------------------------


def readme_examples():
    with open(os.path.join(PROJECT, "README.md"), encoding="utf-8") as readme:
        text = readme.read()
    return re.findall(r"^\| `(/images/[^`]+)` \| ([^|]+) \|$", text, re.MULTILINE)


def test_the_readme_has_examples():
    assert len(readme_examples()) >= 6


@pytest.mark.parametrize("url, result", readme_examples())
def test_each_readme_example_gives_what_the_readme_says(tmp_path, url, result):
    """The README's example table, on the samples, each row checked for what it
    claims: a pixel size, a width, a budget, a format."""
    samples = os.path.join(PROJECT, "samples")
    app = App(dynimg.load_config(write_config(str(tmp_path), samples)))
    parts = urllib.parse.urlsplit(url)
    reply = app.request(parts.path.removeprefix("/images"), parts.query)
    assert reply.status == 200
    image, checked = reply.image(), 0
    if match := re.match(r"(\d+)×(\d+)", result):
        assert image.size == (int(match[1]), int(match[2]))
        checked += 1
    if match := re.search(r"(?<!most )\b(\d+) px wide", result):
        assert image.width == int(match[1])
        checked += 1
    if match := re.search(r"at most (\d+) px wide", result):
        assert image.width <= int(match[1])
        checked += 1
    if match := re.search(r"within the (\S+) byte budget", result):
        assert len(reply.body) <= app.config.profiles[match[1]].max_bytes
        checked += 1
    if "WebP" in result:
        assert image.format == "WEBP"
        checked += 1
    if "never larger than the source" in result:
        name = parts.path.removeprefix("/images/")
        source = Image.open(os.path.join(samples, name))
        assert image.size == source.size
        checked += 1
    if "placeholder" in result:
        assert max(image.size) == dynimg.PLACEHOLDER_SIDE and len(reply.body) <= 450
        checked += 1
    assert checked, f"nothing in {result!r} could be checked"
