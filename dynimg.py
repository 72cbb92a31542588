"""dynimg: an on-the-fly image server for pages that must load fast on slow networks.

Given an image name, a box, and what is known of the client's screen and network
(from the URL or from the browser's client hints), dynimg answers with the
smallest image that still looks right: resized with Pillow(-SIMD), oriented,
converted to sRGB, stripped of metadata and encoded within the byte budget of
the client's network class.

It is one WSGI application, an ``App`` built from a config by ``create_app()``
(dynimg.wsgi does that), with no dependency beyond the standard library and
Pillow. The HTTP contract is in README.md.

    mod_wsgi-express start-server dynimg.wsgi --mount-point /images
    python dynimg.py serve                       # wsgiref, for a quick local try
    python dynimg.py render sunset.jpg --width 340 --height 400 -o out.jpg

Configuration is ``dynimg.ini``, found through the DYNIMG_CONFIG environment
variable or beside this file.
"""

import argparse
import atexit
import base64
import collections
import configparser
import contextlib
import ctypes
import dataclasses
import email.utils
import fcntl
import hashlib
import hmac
import html
import http
import http.client
import ipaddress
import io
import json
import logging
import math
import mimetypes
import os
import re
import socket
import struct
import ssl
import sys
import tempfile
import threading
import time
import types
import urllib.parse
import weakref
import zlib
from typing import Optional

from PIL import (Image, ImageChops, ImageCms, ImageDraw, ImageFilter, ImageMath,
                 JpegImagePlugin, PngImagePlugin, UnidentifiedImageError)

# SVT-AV1 writes a banner to stderr (Apache's error log) on every encode unless
# its log level says errors only; it reads this when an encoder starts.
os.environ.setdefault("SVT_LOG", "1")
try:
    # The one optional piece: Pillow-SIMD cannot build Pillow's own AVIF codec
    # against Debian 12's libavif, so AVIF comes from this plugin (libavif with its
    # encoders bundled), which registers the "AVIF" format with Pillow. Without it
    # dynimg serves JPEG, WebP and PNG.
    from pillow_avif import _avif as avif_codec  # registers the plugin too
    from pillow_avif import AvifImagePlugin
    AvifImagePlugin.DEFAULT_MAX_THREADS = 1  # one decode a core, like every render
except ImportError:
    avif_codec = None

# --- constants and tables ---------------------------------------------------

#: The product's version, shown by /_health.
VERSION = "0.1.0"

#: Part of every image key; raise it whenever the same request would give other bytes.
PROCESSING_VERSION = 4

#: Output formats users may name: Pillow's format name, the media type, alpha support.
FORMATS = {
    "jpeg": ("JPEG", "image/jpeg", False),
    "webp": ("WEBP", "image/webp", True),
    "png": ("PNG", "image/png", True),
    "avif": ("AVIF", "image/avif", True),
}

#: Lossy output formats: their quality follows the network class.
LOSSY_FORMATS = ("jpeg", "webp", "avif")

#: AVIF encoders in the order they are preferred, each with its speed setting
#: (bench/formats.py, one thread, medians): SVT-AV1 at speed (preset) 8 takes 33 ms
#: of CPU at 800 px for 0.59x the bytes of JPEG q80 at the same SSIMULACRA2 (12 ms,
#: 0.73x at 400 px); preset 6 saves 4-6 % more at 3-4x the time; aom needs speed 6
#: (~280 ms) to do better, rav1e speed 8 (~200 ms).
AVIF_ENCODERS = (("svt", 8), ("aom", 9), ("rav1e", 10))

#: Answers of at most this many pixels (a 400-480 px wide photo) get the slower
#: settings below, which cost little there and are kept: per 400 px answer (bench/
#: formats.py --speeds, corpus photos, one core, medians), SVT-AV1 preset 6 is
#: 4.1 % smaller at equal SSIMULACRA2 for 34 ms against 10, WebP method 6 3.8 %
#: smaller for 23 ms against 11. At 800 px they would be 89 ms against 28 (4.8 %)
#: and 76 against 38 (0.7 %); at 1600 px, 278 against 83 and 258 against 142.
#: Faster settings do not pay for a server for slow networks: preset 9 takes 0.7x
#: the time for 6-7 % more bytes, WebP method 2 half for 8-17 % more.
SMALL_ANSWER_PIXELS = 200_000
AVIF_SMALL_ANSWER_SPEEDS = {"svt": 6}

#: SVT-AV1 refuses images under 4 px on a side (and, multi-threaded, could hang on
#: the next encode after such a refusal): those few pixels go to aom.
SVT_MIN_SIDE = 4


def _avif_encoder(skip=()):
    """(codec, speed) of the AVIF encoder used, or None without the AVIF plugin."""
    if avif_codec is None:
        return None
    for codec, speed in AVIF_ENCODERS:
        if codec not in skip and avif_codec.encoder_codec_available(codec):
            return codec, speed
    return None


AVIF_ENCODER = _avif_encoder()
AVIF_TINY_ENCODER = _avif_encoder(skip=("svt",))

#: Output formats this server can encode now.
AVAILABLE_FORMATS = tuple(name for name in FORMATS if name != "avif" or AVIF_ENCODER)

#: Source formats the server decodes, by the names `[limits] formats` takes: the
#: Pillow plugins each name may open. No other decoder is ever handed a source.
INPUT_FORMATS = {
    "jpeg": ("JPEG",),  # multi-picture JPEGs (MPO) too: the JPEG plugin opens them
    "png": ("PNG",),
    "webp": ("WEBP",),
    "gif": ("GIF",),
    "tiff": ("TIFF",),
    "bmp": ("BMP", "DIB"),
    "jpeg2000": ("JPEG2000",),
    "avif": ("AVIF",),
}

#: Fit modes: what happens when the source's aspect differs from the box's.
FITS = {
    "contain": "best fit inside the box, no aspect loss",
    "cover": "fill the box, crop the overflow",
    "fill": "stretch to exactly the box",
    "pad": "contain, then pad to the box with bg",
}

#: Which part of the image `cover` keeps (and where `pad` places it), as fractions.
GRAVITIES = {
    "center": (0.5, 0.5),
    "north": (0.5, 0.0),
    "south": (0.5, 1.0),
    "east": (1.0, 0.5),
    "west": (0.0, 0.5),
    "northeast": (1.0, 0.0),
    "northwest": (0.0, 0.0),
    "southeast": (1.0, 1.0),
    "southwest": (0.0, 1.0),
}

#: Gravities worked out from the image itself: `smart` keeps the point that draws
#: the eye (found after decoding, see smart_focus), `fp:X,Y` centres on a point the
#: URL gives. Both crop (cover); pad places their image as `center` does.
GRAVITY_FORMS = ("smart", "fp:X,Y")

#: gravity=fp:X,Y, each a fraction from 0 to 1 of the upright source's width and
#: height, in ASCII decimals of at most 6 places (0, 1, 0.3, .25).
FOCAL_POINT = re.compile(r"fp:([0-9]?\.?[0-9]{1,6}),([0-9]?\.?[0-9]{1,6})")

#: Spellings accepted for boolean parameters and config values.
BOOLEANS = {"1": True, "true": True, "yes": True, "on": True,
            "0": False, "false": False, "no": False, "off": False}

#: Short names for parameters.
ALIASES = {"w": "width", "h": "height", "q": "quality"}

#: Every query parameter and what it accepts (the 400 messages quote these).
PARAMETERS = {
    "name": "a relative path under the image root",
    "url": "an http(s) URL on an allowed host",
    "width": "an integer from 1 to max_width",
    "height": "an integer from 1 to max_height",
    "forcefit": "one of 1, true, yes, 0, false, no",
    "fit": "one of " + ", ".join(FITS),
    "gravity": "one of " + ", ".join((*GRAVITIES, *GRAVITY_FORMS))
               + " (X and Y from 0 to 1, fractions of the width and height)",
    "upscale": "one of 1, true, yes, 0, false, no",
    "bandwidth": "a network class",
    "screensize": "WxH or a screen name",
    "dpr": "a number from 1 to 4",
    "quality": "an integer from 1 to 100",
    "format": "one of " + ", ".join(FORMATS) + ", auto",
    "bg": "a hex colour such as fff or ffffff",
    "placeholder": "one of 1, true, yes, 0, false, no",
    "sig": "a hex HMAC-SHA256 signature",
}

#: A placeholder's longest side and its quality (JPEG's scale). Measured on the
#: corpus photos: at 24 px and 30, WebP takes 130-220 bytes and JPEG 350-410 (its
#: tables alone are ~300); AVIF's container makes it 440-500 at any quality, so
#: format=auto never picks AVIF for a placeholder. The browser blurs it anyway.
PLACEHOLDER_SIDE = 24
PLACEHOLDER_QUALITY = 30

#: EXIF orientation -> the transpose that makes the image upright (1 needs none).
ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

#: The EXIF tag number of Orientation.
EXIF_ORIENTATION = 0x0112

#: Client hints the server reads; every image response asks for them in Accept-CH.
CLIENT_HINTS = ("ECT", "Downlink", "Save-Data", "Sec-CH-DPR", "Sec-CH-Viewport-Width",
                "Sec-CH-Width")

#: Where JPEG draft() decoding aims, as a multiple of the target size: DCT
#: scaling to at least this much, then one LANCZOS resample for the rest.
DRAFT_FACTOR = 1.0

#: The most a decoder is handed at once (sources are in memory already).
MAX_DECODER_BLOCK = 64 * 1024 * 1024

#: Pillow's reducing_gap for non-JPEG sources: a fast box reduce() first, when the
#: source is this many times the target or more, then LANCZOS.
REDUCING_GAP = 3.0

#: JPEG outputs smaller than this many pixels are baseline: progressive costs
#: 6-28 % more bytes below 128 px wide, ~1 % at 200 px, saves 1-2 % from 400 px
#: (bench/encoding.py); above this it also shows early on slow links.
PROGRESSIVE_MIN_PIXELS = 200 * 200

#: At this JPEG quality and above, chroma is kept at full resolution (4:4:4): it
#: costs ~30 % more bytes at every quality for ~0.008 colour SSIM, worth paying
#: only where the request already asks for near-lossless quality.
FULL_CHROMA_QUALITY = 90

#: Qualities are JPEG's scale everywhere (profiles, URLs): each other lossy format
#: is encoded at the setting that scores at least JPEG's SSIMULACRA2 at that
#: quality on three photos in four (bench/formats.py: the upper quartile over six
#: tuning photos at 400 and 800 px), interpolated between these points.
QUALITY_EQUIVALENTS = {
    "webp": {1: 1, 20: 16, 30: 34, 40: 48, 50: 61, 60: 71, 70: 81, 80: 88, 90: 93, 100: 100},
    "avif": {1: 15, 20: 36, 30: 46, 40: 52, 50: 56, 60: 58, 70: 64, 80: 75, 90: 88, 100: 100},
}

#: WebP method: 4 is 8-17 % smaller than 2 at 2-2.5x the time (3 is as fast and
#: no smaller); small answers take 6 (see SMALL_ANSWER_PIXELS).
WEBP_METHOD = 4
WEBP_SMALL_ANSWER_METHOD = 6

#: Animated WebP (bench/animation.py): method 4 is 6-57 % smaller than 0 at twice
#: the CPU; trying every frame both as a key frame and as a change (minimize_size)
#: saves 0-10 % more for 14-32 % more CPU, so it is off.
WEBP_ANIMATION_METHOD = 4
WEBP_ANIMATION_MINIMIZE = False

#: Source formats whose frames an animated WebP answer keeps (Pillow composites
#: each onto the full canvas); a multi-page TIFF's pages are no animation.
ANIMATED_FORMATS = ("GIF", "WEBP", "PNG")

#: Why an animated source goes out as its first frame alone, by the code a cache
#: entry's name keeps; X-Image-Frames says "first (REASON)", or "all (N)" when every
#: frame goes out.
STILL_REASONS = {
    "a": "the source is animated",  # the answer's format or kind shows one frame
    "n": "over max_frames",
    "p": "over max_animation_pixels",
    "t": "over max_render_seconds",
    "b": "over the byte budget",
    "x": "a later frame cannot be read",
    "o": "a frame lies outside the canvas",
    "m": "over max_render_mb",
}

#: Frames the header scan counts at most (max_frames may be up to this): a file of
#: a million 1x1 frames is known to be over the limit after this many.
MAX_COUNTED_FRAMES = 10_000

#: Blocks (GIF sub-blocks, PNG or RIFF chunks) the header scan walks at most: a
#: 50 MB GIF of 255-byte sub-blocks has 200,000; one cut into 1-byte sub-blocks,
#: 25 million (seconds of Python). Past this the later frames count as unreadable.
MAX_SCANNED_BLOCKS = 400_000

#: Frame durations of 10 ms or less are shown for 100 ms by browsers (GIF, WebP and
#: APNG alike); the WebP encoder refuses 0. The longest a WebP frame may say (24 bits).
SHORTEST_FRAME_MS = 10
SHOWN_FOR_SHORTEST_MS = 100
LONGEST_FRAME_MS = 0xFFFFFF

#: What the animated WebP encoder holds per pixel of the output canvas, beside the
#: frame being made: measured 26 bytes (a 2000x1250 and a 4000x2500 photo
#: animation at their own size, bench/animation.py), rounded up.
ANIMATION_ENCODER_BYTES_PER_PIXEL = 28

#: The most times a WebP animation may say it plays (0 is for ever).
MAX_LOOP_COUNT = 65535

#: The EXIF tag number of Copyright, kept when [output] keep_copyright is on.
EXIF_COPYRIGHT = 0x8298

#: PNG answers up to this many pixels are optimised (zlib level 9 and a filter
#: search); larger ones use zlib level 3, about 15 % more bytes in a fifth of the
#: time (a 9 Mpx photo: 1.6 s against 8.6 s), so no PNG encode runs for long.
PNG_OPTIMIZE_MAX_PIXELS = 1_000_000
PNG_LARGE_COMPRESS_LEVEL = 3

#: With a byte budget, a PNG answer starts at most this many pixels a budget byte
#: (a palette PNG of a photo takes about 0.3 bytes a pixel): a 16 kB budget never
#: pays for encoding 16 Mpx first.
PNG_PIXELS_PER_BUDGET_BYTE = 4

#: How many times the byte-budget search may scale an image down before giving up.
BUDGET_SCALE_STEPS = 6

#: Encodes the quality search may spend after the first one.
QUALITY_SEARCH_ENCODES = 3

#: Guesses aim this far under the budget (the curve is typical, not exact), and an
#: answer this full needs no further encode to creep closer.
BUDGET_AIM = 0.95
BUDGET_CLOSE_ENOUGH = 0.85

#: Typical bytes at each quality (JPEG's scale, see QUALITY_EQUIVALENTS) relative
#: to quality 80: medians over the corpus photos at 360 and 800 px (bench/delivery.py
#: prints how many encodes a budgeted answer then needs). JPEG jumps at 90, where
#: chroma goes 4:4:4.
QUALITY_CURVES = {
    "jpeg": {5: 0.22, 10: 0.25, 15: 0.29, 20: 0.34, 25: 0.393, 30: 0.44, 35: 0.485,
             40: 0.524, 45: 0.566, 50: 0.603, 55: 0.641, 60: 0.687, 65: 0.742, 70: 0.807,
             75: 0.882, 80: 1.0, 85: 1.162, 90: 1.864, 95: 2.713, 100: 4.0},
    "webp": {5: 0.194, 10: 0.228, 15: 0.252, 20: 0.277, 25: 0.328, 30: 0.378, 35: 0.407,
             40: 0.442, 45: 0.47, 50: 0.509, 55: 0.539, 60: 0.564, 65: 0.613, 70: 0.741,
             75: 0.824, 80: 1.0, 85: 1.143, 90: 1.417, 95: 1.864, 100: 2.407},
    "avif": {5: 0.177, 10: 0.229, 15: 0.273, 20: 0.33, 25: 0.382, 30: 0.45, 35: 0.5,
             40: 0.56, 45: 0.586, 50: 0.61, 55: 0.641, 60: 0.672, 65: 0.708, 70: 0.776,
             75: 0.889, 80: 1.0, 85: 1.323, 90: 1.63, 95: 2.371, 100: 5.537},
}

#: Bytes fall about as (linear scale) ** this when an image is scaled down at a
#: fixed quality (1.27-1.9 on the corpus photos, median 1.5); each step refines it.
BYTES_BY_SCALE_EXPONENT = 1.5
#: The exponent least over the truth on those photos: a prediction made with it is
#: the smallest the bytes can be.
BYTES_BY_SCALE_LOWEST = 1.25

#: A budgeted answer of this many pixels or more, with fewer budget bytes a pixel
#: than this, is first encoded as a copy of BUDGET_PROBE_PIXELS: where that copy
#: says the whole image cannot fit, the search starts from its prediction instead
#: of from an encode of the whole (a 3200 px WebP takes ~0.5 s; the copy, a
#: twentieth of that). With more bytes a pixel, the corpus photos mostly fit
#: whole (4g's 500 kB at 3200 px: 3 of 4), and the copy would be an encode more.
BUDGET_PROBE_MIN_PIXELS = 1_000_000
BUDGET_PROBE_MAX_BYTES_PER_PIXEL = 0.05
BUDGET_PROBE_PIXELS = 250_000  # over SMALL_ANSWER_PIXELS: the whole's encoder settings

#: What opening a source may read before its pixel data: every corpus file needs
#: at most 53 reads and 43 kB. Past these, the header is a 422: a header stuffed
#: with empty segments, chunks, comment blocks or strip offsets cannot make the
#: parse slow or large (4 MB of them took 1 s and +137 MB before).
MAX_HEADER_READS = 1024
MAX_HEADER_BYTES = 4 * 1024 * 1024

#: A render's peak memory per source pixel, by the mode the source opens in:
#: the decoded image and the full-size copies before the resize (mode
#: conversions, premultiplied alpha). Measured rendering 6 Mpx sources to 400 px
#: (L 1.3 bytes, RGB 5.3, RGBA 8.6, 16-bit grey 10, float 12, CMYK 8), rounded up;
#: a mode not listed counts as the largest.
RENDER_BYTES_PER_PIXEL = {"1": 2, "L": 2, "P": 6, "RGB": 6, "YCbCr": 6, "LA": 9, "La": 9,
                          "PA": 9, "RGBA": 9, "RGBa": 9, "CMYK": 8, "I;16": 10, "I;16B": 10,
                          "I;16L": 10, "I": 12, "F": 12}

#: Decoders that take more than that, per pixel (measured the same way). AVIF
#: measured 9.3 (RGB) and 13 (RGBA) for 8-bit 4:2:0; high bit depths hold their
#: planes at 16 bits (up to 6 bytes a pixel more at 4:4:4).
DECODER_BYTES_PER_PIXEL = {"WEBP": 19, "JPEG2000": 20, "AVIF": 19}

#: What a still answer takes on top of the source's render, per pixel of the answer:
#: the answer itself (Pillow holds RGB in 4 bytes) and its encoder's working memory
#: (peak RSS growth of a fresh process in Image.save, a photo at 1000-4000 px, on
#: top of ~10 MB for any AVIF encode): SVT-AV1 17-26 bytes, 35-37 with the huge
#: pages the Makefile's GLIBC_TUNABLES asks for; WebP 1-6.3, JPEG 2-2.6, PNG up to
#: 1.4. AVIF's is what counts: a 4000x4000 AVIF answer takes ~670 MB, however small
#: its source (tests/test_limits.py checks these on the codecs).
ANSWER_BYTES_PER_PIXEL = 4
ENCODER_BYTES_PER_PIXEL = {"avif": 38, "webp": 7, "jpeg": 3, "png": 2}

#: So a negotiated (format=auto) answer larger than this goes out in the next format
#: the client takes: as AVIF it would take ~340 MB with its encoder; as WebP, 90 MB.
#: Past 8 Mpx, the client is a high-density screen on a fast network, where AVIF's
#: 20-25 % fewer bytes matter least. Smaller answers do the same where the source's
#: decode at its full size (Facts.decode_bytes_per_pixel, which a master carries
#: for its source, so that both plan the same) would take the AVIF render past
#: max_render_mb: a 422 a browser cannot avoid. format=avif asks for AVIF whatever
#: its size, within max_render_mb.
AUTO_AVIF_MAX_PIXELS = 8_000_000

#: A source with a transparent colour (tRNS, a GIF's transparent index) is first
#: made LA or RGBA, full size: measured 7.7 bytes a pixel more for 1-bit, grey and
#: palette sources, 4.3 for 16-bit grey.
TRANSPARENCY_BYTES_PER_PIXEL = 8

#: A progressive JPEG keeps every DCT coefficient of the full-size image, whatever
#: its DCT scaling: two bytes a coefficient, per component at full resolution (an
#: upper bound: 4:2:0 takes half). Measured 3.3 bytes a pixel for 4:2:0 RGB, 6.3
#: for 4:4:4, 8.3 for CMYK.
JPEG_COEFFICIENT_BYTES = 2

#: Scans a JPEG may have: each one walks every block of the image again (3 ms a
#: scan at 100 Mpx), and encoders make about ten; thousands of empty scans would
#: hold a render for minutes.
MAX_JPEG_SCANS = 100

#: Colour transforms an app keeps (one per embedded ICC profile), least recently
#: used dropped first: hostile files with ever new profiles cannot grow memory.
TRANSFORM_CACHE_SIZE = 64

#: Sources whose upright size and alpha an app remembers, so that the key of a
#: cache hit needs no more than a stat.
FACTS_CACHE_SIZE = 4096

#: The longest image name, and the longest part of one (file systems stop at 255).
MAX_NAME_BYTES = 1024
MAX_NAME_PART_BYTES = 255

log = logging.getLogger("dynimg")

# --- errors -------------------------------------------------------------------


class HTTPError(Exception):
    """An answer other than the image: a status and a short public message.

    `image` names the config attribute of the picture sent with the status
    (None: a line of text).
    """

    status = 500
    image: Optional[str] = None

    def __init__(self, message="", detail=None):
        super().__init__(message)
        self.message = message
        self.detail = detail or message


class BadRequest(HTTPError):
    status = 400


class Forbidden(HTTPError):
    status = 403


class NotFound(HTTPError):
    status = 404
    image = "not_found_image"


class MethodNotAllowed(HTTPError):
    status = 405


class Unprocessable(HTTPError):
    status = 422
    image = "error_image"


class BadGateway(HTTPError):
    status = 502
    image = "error_image"


class Busy(HTTPError):
    """No render slot came free within queue_timeout: come back shortly."""

    status = 503


class GatewayTimeout(HTTPError):
    status = 504
    image = "error_image"


class InternalError(HTTPError):
    status = 500
    image = "error_image"


class ConfigError(Exception):
    """A bad value in dynimg.ini; the message names the section and key."""


# --- config -----------------------------------------------------------------

#: Every config key and its default; dynimg.ini documents each one.
DEFAULTS = {
    "server": {
        "image_root": "samples",
        "not_found_image": "404image.png",
        "error_image": "errorimage.png",
        "log_file": "",
        "log_level": "INFO",
        "cache_max_age": "86400",
        "shared_max_age": "60",
        "stale_while_revalidate": "3600",
        "stale_if_error": "86400",
        "error_max_age": "60",
        "health_details": "no",
        "demo": "yes",
    },
    "cache": {
        "cache_dir": "/var/tmp/dynimg-cache",
        "cache_max_mb": "1024",
        "fsync": "no",
        "lock_timeout": "30",
    },
    "output": {
        "format": "jpeg",
        "auto_formats": "avif webp jpeg",
        "bg": "ffffff",
        "keep_copyright": "no",
        "png_palette": "no",
    },
    "limits": {
        "max_width": "4000",
        "max_height": "4000",
        "max_dpr": "4",
        "max_source_bytes": "52428800",
        "max_source_pixels": "100000000",
        "formats": " ".join(INPUT_FORMATS),
        "max_render_seconds": "10",
        "max_render_mb": "512",
        "max_frames": "1000",
        "max_animation_pixels": "30000000",
        "allowed_widths": "",
        "max_concurrent_renders": "0",
        "max_waiting_renders": "12",
        "queue_timeout": "10",
    },
    "hints": {
        "downlink_classes": "slow-2g 0.05, 2g 0.07, 3g 0.7, 4g",
        "width_steps": "160 240 320 360 400 480 540 640 720 800 960 1080 1280 1440 "
                       "1600 1920 2048 2560 3200 3840",
        "dpr_steps": "1 1.5 2 3 4",
    },
    "screens": {
        "mobile": "360x800",
        "tablet": "800x1280",
        "desktop": "1920x1080",
    },
    "security": {
        "signing_key": "",
    },
    "remote": {
        "allowed_hosts": "",
        "allowed_networks": "",
        "connect_timeout": "3",
        "read_timeout": "10",
        "total_timeout": "20",
        "max_redirects": "3",
        "refetch_after": "3600",
    },
    "metrics": {
        "run_dir": "/var/tmp/dynimg-metrics",
        "allowed_networks": "127.0.0.0/8 ::1",
    },
    "network.default": {"quality": "80", "min_quality": "60", "max_bytes": "0", "max_dpr": "3",
                        "progressive": "no"},
    "network.save-data": {"quality": "60", "min_quality": "60", "max_bytes": "30000",
                          "max_dpr": "1", "progressive": "yes"},
    "network.slow-2g": {"quality": "60", "min_quality": "60", "max_bytes": "10000",
                        "max_dpr": "1", "progressive": "yes"},
    "network.2g": {"quality": "60", "min_quality": "60", "max_bytes": "16000", "max_dpr": "1",
                   "progressive": "yes"},
    "network.3g": {"quality": "65", "min_quality": "60", "max_bytes": "120000", "max_dpr": "2",
                   "progressive": "yes"},
    "network.4g": {"quality": "78", "min_quality": "60", "max_bytes": "500000", "max_dpr": "3",
                   "progressive": "no"},
    "network.wifi": {"quality": "82", "min_quality": "65", "max_bytes": "0", "max_dpr": "4",
                     "progressive": "no"},
}

#: A class of the operator's own takes progressive JPEG unless it says otherwise.
PROFILE_DEFAULTS = {"progressive": "yes"}


@dataclasses.dataclass(frozen=True)
class Profile:
    """What one network class gets: quality, its floor, a byte budget, a dpr cap, and
    whether its JPEGs are progressive."""

    quality: int
    min_quality: int
    max_bytes: int
    max_dpr: float
    progressive: bool


@dataclasses.dataclass(frozen=True)
class Config:
    """dynimg.ini, read and checked once."""

    path: str
    image_root: str
    not_found_image: str
    error_image: str
    log_file: str
    log_level: str
    cache_max_age: int
    shared_max_age: int
    stale_while_revalidate: int
    stale_if_error: int
    error_max_age: int
    health_details: bool
    demo: bool
    cache_dir: str
    cache_max_mb: int
    cache_fsync: bool
    lock_timeout: int
    format: str
    auto_formats: tuple
    bg: str
    keep_copyright: bool
    png_palette: bool
    max_width: int
    max_height: int
    max_dpr: float
    max_source_bytes: int
    max_source_pixels: int
    input_formats: tuple
    max_render_seconds: float
    max_render_mb: int
    max_frames: int
    max_animation_pixels: int
    allowed_widths: tuple
    max_concurrent_renders: int
    max_waiting_renders: int
    queue_timeout: float
    downlink_classes: tuple
    width_steps: tuple
    dpr_steps: tuple
    screens: types.MappingProxyType
    profiles: types.MappingProxyType
    signing_keys: tuple
    allowed_hosts: tuple
    allowed_networks: tuple
    connect_timeout: float
    read_timeout: float
    total_timeout: float
    max_redirects: int
    refetch_after: int
    metrics_dir: str
    metrics_networks: tuple


def default_config_path():
    """DYNIMG_CONFIG if set, else the dynimg.ini beside this module."""
    return os.environ.get("DYNIMG_CONFIG") or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "dynimg.ini")


def load_config(path=None):
    """Read the INI over the defaults and check every value; raises ConfigError."""
    path = os.path.abspath(path or default_config_path())
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_dict(DEFAULTS)
    try:
        with open(path, encoding="utf-8") as ini:
            parser.read_file(ini)
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from None
    except configparser.Error as error:
        raise ConfigError(f"{path}: {error}") from None
    read = _ConfigReader(parser, os.path.dirname(path))
    return Config(
        path=path,
        image_root=read.folder("server", "image_root"),
        not_found_image=read.file("server", "not_found_image"),
        error_image=read.file("server", "error_image"),
        log_file=read.path("server", "log_file"),
        log_level=read.choice("server", "log_level", logging.getLevelNamesMapping()),
        cache_max_age=read.integer("server", "cache_max_age", 0),
        shared_max_age=read.integer("server", "shared_max_age", 0),
        stale_while_revalidate=read.integer("server", "stale_while_revalidate", 0),
        stale_if_error=read.integer("server", "stale_if_error", 0),
        error_max_age=read.integer("server", "error_max_age", 0),
        health_details=BOOLEANS[read.choice("server", "health_details", BOOLEANS)],
        demo=BOOLEANS[read.choice("server", "demo", BOOLEANS)],
        cache_dir=read.path("cache", "cache_dir"),
        cache_max_mb=read.integer("cache", "cache_max_mb", 1),
        cache_fsync=BOOLEANS[read.choice("cache", "fsync", BOOLEANS)],
        lock_timeout=read.integer("cache", "lock_timeout", 0, 3600),
        format=read.choice("output", "format", AVAILABLE_FORMATS),
        auto_formats=read.auto_formats("output", "auto_formats"),
        bg=read.colour("output", "bg"),
        keep_copyright=BOOLEANS[read.choice("output", "keep_copyright", BOOLEANS)],
        png_palette=BOOLEANS[read.choice("output", "png_palette", BOOLEANS)],
        max_width=read.integer("limits", "max_width", 1, 65535),
        max_height=read.integer("limits", "max_height", 1, 65535),
        max_dpr=read.number("limits", "max_dpr", 1, 4),
        max_source_bytes=read.integer("limits", "max_source_bytes", 1),
        max_source_pixels=read.integer("limits", "max_source_pixels", 1),
        input_formats=read.formats("limits", "formats"),
        max_render_seconds=read.number("limits", "max_render_seconds", 0.1, 600),
        max_render_mb=read.integer("limits", "max_render_mb", 1),
        max_frames=read.integer("limits", "max_frames", 1, MAX_COUNTED_FRAMES),
        max_animation_pixels=read.integer("limits", "max_animation_pixels", 1),
        allowed_widths=read.numbers("limits", "allowed_widths", int, empty=True),
        max_concurrent_renders=(read.integer("limits", "max_concurrent_renders", 0, 1024)
                                or len(os.sched_getaffinity(0)) or 2),
        max_waiting_renders=read.integer("limits", "max_waiting_renders", 0, 1024),
        queue_timeout=read.number("limits", "queue_timeout", 0, 600),
        downlink_classes=read.downlink_classes(),
        width_steps=read.numbers("hints", "width_steps", int),
        dpr_steps=read.numbers("hints", "dpr_steps", float),
        screens=types.MappingProxyType(read.screens()),
        profiles=types.MappingProxyType(read.profiles()),
        signing_keys=tuple(read.words("security", "signing_key")),
        allowed_hosts=tuple(word.lower() for word in read.words("remote", "allowed_hosts")),
        allowed_networks=read.networks("remote", "allowed_networks"),
        connect_timeout=read.number("remote", "connect_timeout", 0.1, 600),
        read_timeout=read.number("remote", "read_timeout", 0.1, 600),
        total_timeout=read.number("remote", "total_timeout", 0.1, 600),
        max_redirects=read.integer("remote", "max_redirects", 0, 20),
        refetch_after=read.integer("remote", "refetch_after", 1),
        metrics_dir=read.path("metrics", "run_dir"),
        metrics_networks=read.networks("metrics", "allowed_networks"),
    )


class _ConfigReader:
    """Typed access to a ConfigParser whose errors name section and key."""

    def __init__(self, parser, folder):
        self.parser = parser
        self.folder_of_ini = folder

    def _fail(self, section, key, expected):
        value = self.parser.get(section, key, fallback="")
        raise ConfigError(f"[{section}] {key} = {value!r}: must be {expected}")

    def text(self, section, key):
        return self.parser.get(section, key).strip()

    def words(self, section, key):
        return self.text(section, key).replace(",", " ").split()

    def path(self, section, key):
        value = self.text(section, key)
        return os.path.join(self.folder_of_ini, value) if value else ""

    def folder(self, section, key):
        value = os.path.realpath(self.path(section, key))
        if not os.path.isdir(value):
            self._fail(section, key, "an existing folder")
        return value

    def file(self, section, key):
        value = self.path(section, key)
        if not os.path.isfile(value):
            self._fail(section, key, "an existing file")
        return value

    def integer(self, section, key, low, high=None):
        value = self.text(section, key)
        if not re.fullmatch(r"[0-9]{1,12}", value) or not low <= int(value) <= (high or 1e13):
            self._fail(section, key, f"an integer from {low}" + (f" to {high}" if high else ""))
        return int(value)

    def number(self, section, key, low, high):
        try:
            value = float(self.text(section, key))
        except ValueError:
            value = math.nan
        if not low <= value <= high:
            self._fail(section, key, f"a number from {low} to {high}")
        return value

    def choice(self, section, key, table):
        value = self.text(section, key)
        if value not in table:
            self._fail(section, key, "one of " + ", ".join(table))
        return value

    def colour(self, section, key):
        value = _parse_colour(self.text(section, key))
        if value is None:
            self._fail(section, key, "a hex colour such as fff or ffffff")
        return value

    def numbers(self, section, key, kind, empty=False):
        try:
            values = tuple(sorted(kind(word) for word in self.words(section, key)))
        except ValueError:
            values = (0,)
        if (not values and not empty) or (values and values[0] <= 0):
            self._fail(section, key, "a list of positive numbers")
        return values

    def auto_formats(self, section, key):
        """Output formats in the order format=auto prefers them, those this server
        cannot encode (AVIF without its plugin) left out; JPEG ends every list, as
        the format every client shows."""
        names = self.words(section, key)
        if any(name not in FORMATS for name in names):
            self._fail(section, key, "a list of " + ", ".join(FORMATS))
        names = [name for name in names if name in AVAILABLE_FORMATS] + ["jpeg"]
        return tuple(dict.fromkeys(names))

    def formats(self, section, key):
        """Source format names -> the Pillow plugins they open."""
        names = self.words(section, key)
        if not names or any(name not in INPUT_FORMATS for name in names):
            self._fail(section, key, "a list of " + ", ".join(INPUT_FORMATS))
        Image.init()  # only plugins this Pillow build has can be named to it
        return tuple(plugin for name in names for plugin in INPUT_FORMATS[name]
                     if plugin in Image.OPEN)

    def networks(self, section, key):
        try:
            return tuple(ipaddress.ip_network(word, strict=False)
                         for word in self.words(section, key))
        except ValueError:
            self._fail(section, key, "a list of networks such as 10.0.0.0/8")

    def downlink_classes(self):
        """'slow-2g 0.05, 2g 0.07, 3g 0.7, 4g': class for a downlink below each figure."""
        steps = [item.split() for item in self.text("hints", "downlink_classes").split(",")]
        try:
            *bounded, (last,) = steps
            table = tuple((name, float(limit)) for name, limit in bounded) + ((last, math.inf),)
        except ValueError:
            table = ()
        if not table or any(f"network.{name}" not in self.parser for name, _ in table):
            self._fail("hints", "downlink_classes",
                       "'CLASS MBPS, ..., CLASS' naming [network.*] classes")
        return table

    def screens(self):
        screens = {}
        for name in self.parser["screens"]:
            screens[name] = _parse_screen_size(self.text("screens", name))
            if screens[name] is None:
                self._fail("screens", name, "WxH, such as 360x800")
        return screens

    def profiles(self):
        profiles = {}
        for section in self.parser.sections():
            if section.startswith("network."):
                for key, value in PROFILE_DEFAULTS.items():
                    self.parser[section].setdefault(key, value)
                profiles[section[len("network."):]] = Profile(
                    quality=self.integer(section, "quality", 1, 100),
                    min_quality=self.integer(section, "min_quality", 1, 100),
                    max_bytes=self.integer(section, "max_bytes", 0),
                    max_dpr=self.number(section, "max_dpr", 1, 4),
                    progressive=BOOLEANS[self.choice(section, "progressive", BOOLEANS)])
        return profiles


#: What may not stand in a log line as it is: C0 and C1 controls, Unicode line
#: breaks, and the surrogates that stand for a path's bytes that were not UTF-8.
_CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


class OneLineFormatter(logging.Formatter):
    """Log records whose message is one line whatever the request held: control
    characters (a name with %0d%0a) are escaped, so no request can forge a line.
    A traceback, added after the message, keeps its own lines."""

    def formatMessage(self, record):
        record.message = _CONTROL_CHARACTERS.sub(
            lambda match: match[0].encode("unicode_escape").decode("ascii"), record.message)
        return super().formatMessage(record)


def configure_logging(config):
    """Send the 'dynimg' logger to the INI's log file (or stderr) at its level."""
    handler = (logging.FileHandler(config.log_file, encoding="utf-8", errors="backslashreplace")
               if config.log_file else logging.StreamHandler(sys.stderr))
    handler.setFormatter(OneLineFormatter(
        "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    for old in list(log.handlers):
        log.removeHandler(old)
    log.addHandler(handler)
    log.setLevel(config.log_level)
    log.propagate = False


#: PNG text chunks: the most one chunk, and all of them together, may decompress to.
MAX_TEXT_CHUNK = 256 * 1024
MAX_TEXT_MEMORY = 1024 * 1024


def limit_pillow():
    """Pillow's process-wide guards, the same for every app: PNG text chunks are
    capped, and its own pixel limit gives way to each app's max_source_pixels,
    checked after the lazy open and before any pixel is decoded (open_image)."""
    Image.MAX_IMAGE_PIXELS = None
    PngImagePlugin.MAX_TEXT_CHUNK = MAX_TEXT_CHUNK
    PngImagePlugin.MAX_TEXT_MEMORY = MAX_TEXT_MEMORY
    # Opening a JPEG, Pillow reads its DPI from the EXIF with a reader that copies
    # every tag's data (a 64 kB EXIF of tags over one range took 350 MB); no answer
    # uses the DPI. dynimg reads the EXIF it needs itself (_exif_tag).
    JpegImagePlugin.JpegImageFile._read_dpi_from_exif = _no_dpi_from_exif


def _no_dpi_from_exif(image):
    """In place of Pillow's DPI-from-EXIF: nothing."""


#: glibc's mallopt() parameters (malloc.h).
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8

#: Allocations from this size get pages of their own, returned to the system when
#: freed. Fixing it also stops glibc raising it after each freed image buffer
#: (up to 32 MiB), which left later image buffers in the heap.
MMAP_THRESHOLD = 1024 * 1024

#: malloc arenas per process: glibc's default (8 a core) lets each render thread
#: fragment an arena of its own; two hold the peak RSS of a soak down by a quarter.
MALLOC_ARENAS = 2


try:
    _LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
    _malloc_trim = _LIBC.malloc_trim
except (OSError, AttributeError):
    _LIBC = _malloc_trim = None  # not glibc: its own defaults stand, nothing to release


def tune_malloc():
    """Keep a long-running process's memory flat: image buffers are large, short-lived
    and made by several threads at once (bench/soak.py measures it). glibc only.

    Pages of their own cost page faults; GLIBC_TUNABLES=glibc.malloc.hugetlb=1 in
    the server's environment (the Makefile sets it) makes them huge pages."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        _LIBC.mallopt(_M_ARENA_MAX, MALLOC_ARENAS)


#: At most one release of freed memory a second in a process (see below).
RELEASE_INTERVAL_SECONDS = 1.0

#: When the process last released freed memory. The one module global that changes:
#: the heap is the process's, shared by every app in it, and so is its ration.
_last_release = 0.0


def release_freed_memory():
    """Give the heaps' free pages back to the system, at most once a second. An AVIF
    encode frees thousands of buffers under MMAP_THRESHOLD, and the holes they leave
    stay in the process: in the variant soak (bench/soak.py --formats avif), a
    process answering AVIF clients grew from ~300 MB to 500-620 MB in three minutes,
    where JPEG and WebP clients held ~140; with a release after every AVIF encode it
    held 150-250, flat. A release costs the next encode its page faults back (7-14
    ms of an 800 px encode's 38), so it is rationed rather than done each time."""
    global _last_release
    now = time.monotonic()
    if _malloc_trim is not None and now - _last_release >= RELEASE_INTERVAL_SECONDS:
        _last_release = now  # a race between threads costs one release more at worst
        _malloc_trim(0)


# --- request parsing ----------------------------------------------------------


#: The request headers dynimg reads; nothing else of the request is kept.
REQUEST_HEADERS = ("Accept", "ECT", "Downlink", "Save-Data", "Sec-CH-DPR", "DPR",
                   "Sec-CH-Viewport-Width", "Viewport-Width", "Sec-CH-Width", "Width",
                   "If-None-Match", "If-Modified-Since", "X-Forwarded-For", "Forwarded")

#: Each of them by its WSGI environ key.
_ENVIRON_KEYS = {name: "HTTP_" + name.upper().replace("-", "_") for name in REQUEST_HEADERS}


@dataclasses.dataclass(frozen=True)
class Request:
    """What dynimg reads of one HTTP request, taken from the WSGI environ once.

    `path` is PATH_INFO as the UTF-8 text the client sent (PEP 3333 hands it over
    as latin-1); bytes that are not UTF-8 stay as surrogates and are refused where
    the path is used as a name.
    """

    method: str = "GET"
    path: str = ""
    query: str = ""
    script_name: str = ""
    headers: types.MappingProxyType = dataclasses.field(
        default_factory=lambda: types.MappingProxyType({}))
    remote_addr: str = ""

    @classmethod
    def from_environ(cls, environ):
        headers = {name: environ[key].strip() for name, key in _ENVIRON_KEYS.items()
                   if key in environ}
        path = environ.get("PATH_INFO", "").encode("latin-1", "replace")
        return cls(method=environ.get("REQUEST_METHOD", "GET"),
                   path=path.decode("utf-8", "surrogateescape"),
                   query=environ.get("QUERY_STRING", ""),
                   script_name=environ.get("SCRIPT_NAME", ""),
                   headers=types.MappingProxyType(headers),
                   remote_addr=environ.get("REMOTE_ADDR", ""))

    def header(self, *names):
        """The first of `names` present, as (name, value), else (names[0], None)."""
        for name in names:
            if name in self.headers:
                return name, self.headers[name]
        return names[0], None


@dataclasses.dataclass(frozen=True)
class Spec:
    """One request, fully resolved: the whole answer to "what image is this?".

    Widths and heights are device pixels (dpr, screen caps and hints folded in).
    The fields from `network` on describe the request, not the bytes. What goes
    into the image key is chosen in image_key(), from the Plan this spec gives
    for one source.
    """

    name: str
    width: Optional[int]
    height: Optional[int]
    fit: str
    gravity: str
    upscale: bool
    format: str
    png_for_alpha: bool
    quality: int
    min_quality: int
    max_bytes: int
    progressive: bool
    bg: str
    url: str = ""
    keep_copyright: bool = False
    png_palette: bool = False
    network: str = "default"
    dpr: float = 1.0
    vary: tuple = ()
    placeholder: bool = False
    focal_point: tuple = ()  # gravity=fp: (X, Y), fractions of the upright source
    animation_format: str = ""
    # a negotiated AVIF answer of more than AUTO_AVIF_MAX_PIXELS goes out in this
    large_answer_format: str = ""


def parse_spec(request, config):
    """Turn a Request into a Spec; raises BadRequest naming the parameter."""
    params = _parse_query(request.query)
    check_signature(request, config)
    name, url = _request_source(request, params, config)
    placeholder = _bool_param(params, "placeholder", False)
    if placeholder:
        # a placeholder shows the framing and nothing finer: the hints that choose a
        # class, a density or a width cannot change it, so they are not read
        request = dataclasses.replace(request, headers=types.MappingProxyType(
            {"Accept": request.headers["Accept"]} if "Accept" in request.headers else {}))
    network, vary = _choose_network(params, request, config)
    profile = config.profiles[network]
    dpr, vary = _choose_dpr(params, request, profile, config, vary)
    width, height, vary = _choose_box(params, request, dpr, config, vary)
    fit = _choose_fit(params)
    image_format, png_for_alpha, vary = _choose_format(params, request, config, vary,
                                                       placeholder)
    quality = _int_param(params, "quality", 1, 100, profile.quality)
    # checked whatever the fit (the plan uses it for cover and pad only)
    gravity, focal_point = _choose_gravity(params)
    spec = Spec(
        name=name, url=url, width=width, height=height, fit=fit,
        gravity=gravity, focal_point=focal_point,
        upscale=_bool_param(params, "upscale", False),
        format=image_format, png_for_alpha=png_for_alpha,
        quality=quality, min_quality=min(profile.min_quality, quality),
        max_bytes=profile.max_bytes, progressive=profile.progressive,
        bg=_colour_param(params, "bg", config.bg),
        keep_copyright=config.keep_copyright, png_palette=config.png_palette,
        network=network, dpr=dpr, vary=tuple(sorted(vary)),
        animation_format=_choose_animation_format(params, request, config, image_format),
        large_answer_format=_large_answer_format(params, request, config, image_format))
    if placeholder:
        # a few hundred bytes: no budget to search, no scans, no copyright line, no
        # PNG kept for alpha (see plan_output)
        return dataclasses.replace(
            spec, quality=PLACEHOLDER_QUALITY, min_quality=PLACEHOLDER_QUALITY, max_bytes=0,
            progressive=False, png_for_alpha=False, keep_copyright=False,
            vary=tuple(sorted(vary & {"Accept"})), placeholder=True)
    return spec


def _parse_query(query, accepted=PARAMETERS, aliases=ALIASES):
    """Strict query parsing: aliases resolved; unknown and repeated names refused,
    and values that are empty or longer than `accepted` allows (a description of
    what a parameter takes, or (longest text, "" allowed) for /_html's texts)."""
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise BadRequest("query: must be UTF-8 text") from None
    params = {}
    for raw_name, value in pairs:
        name = aliases.get(raw_name, raw_name)
        if name not in accepted:
            raise BadRequest(f"{_printable(raw_name)}: unknown parameter; accepted: "
                             + ", ".join(sorted(accepted)))
        if name in params:
            raise BadRequest(f"{name}: given more than once")
        takes = accepted[name]
        longest, empty_allowed = takes if isinstance(takes, tuple) else (None, False)
        if not value and not empty_allowed:
            raise BadRequest(f"{name}: empty; must be {takes if longest is None else 'text'}")
        if longest is not None and len(value) > longest:
            raise BadRequest(f"{name}: at most {longest} characters")
        params[name] = value
    return types.MappingProxyType(params)


def _request_source(request, params, config):
    """(name, url): the path form (/images/x.jpg), ?name=, or a remote ?url=."""
    path_name = request.path.lstrip("/")
    given = [what for what, present in (("the path", path_name), ("name", "name" in params),
                                        ("url", "url" in params)) if present]
    if len(given) > 1:
        raise BadRequest(f"{'url' if 'url' in params else 'name'}: give one source, not "
                         + " and ".join(given))
    if "url" in params:
        return "", check_remote_url(params["url"], config)
    name = path_name or params.get("name", "")
    if not name:
        raise BadRequest("name: required, as /images/NAME or ?name=NAME")
    return check_name(name), ""


def check_name(name):
    """Refuse names that could only be attempts to leave the image root, and names
    no file system holds; returns the name with empty and '.' parts dropped."""
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("name: the path must be UTF-8 text") from None
    parts = name.split("/")
    if ("\x00" in name or "\\" in name or name.startswith("/")
            or any(part == ".." for part in parts)):
        raise BadRequest("name: must be a relative path inside the image root")
    if len(encoded) > MAX_NAME_BYTES or any(len(part.encode()) > MAX_NAME_PART_BYTES
                                            for part in parts):
        raise BadRequest(f"name: too long (at most {MAX_NAME_BYTES} bytes, "
                         f"{MAX_NAME_PART_BYTES} between slashes)")
    return "/".join(part for part in parts if part not in ("", "."))


def _choose_network(params, request, config):
    """The network class: ?bandwidth=, else Save-Data, ECT, then Downlink.

    Vary depends on the URL alone, never on which hints came (Downlink is listed
    even when ECT decided): a cache that keeps one Vary list per URL (Apache's
    mod_cache, many CDNs) loses every variant stored under another list."""
    if "bandwidth" in params:
        # default and save-data too: a URL that must get their answer whatever the
        # hints (the demo's tiles are such URLs)
        network = params["bandwidth"]
        if network not in config.profiles:
            raise BadRequest("bandwidth: must be one of " + ", ".join(config.profiles))
        return network, set()
    vary = {"Save-Data", "ECT", "Downlink"}
    if request.header("Save-Data")[1] in ("on", "?1"):
        return "save-data", vary
    ect = (request.header("ECT")[1] or "").lower()
    if ect in config.profiles and ect not in ("default", "save-data"):
        return ect, vary
    downlink = _hint_number(request.header("Downlink")[1], 0, 10000)
    if downlink is None:
        return "default", vary
    return next(name for name, below in config.downlink_classes if downlink < below), vary


def _choose_dpr(params, request, profile, config, vary):
    """Device pixel ratio: ?dpr=, else the DPR hint snapped up to a step; capped."""
    cap = min(profile.max_dpr, config.max_dpr)
    if "dpr" in params:
        return min(_number_param(params, "dpr", 1, 4), cap), vary
    name, value = request.header("Sec-CH-DPR", "DPR")
    hinted = _hint_number(value, 0.1, 10)
    if hinted is None:
        return 1.0, vary | {"Sec-CH-DPR", "DPR"}
    return min(_snap_up(hinted, config.dpr_steps), cap), vary | {"Sec-CH-DPR", "DPR"}


def _choose_box(params, request, dpr, config, vary):
    """The target box in device pixels, from width/height, hints and the screen."""
    width = _int_param(params, "width", 1, config.max_width, None)
    height = _int_param(params, "height", 1, config.max_height, None)
    if width and config.allowed_widths and width not in config.allowed_widths:
        raise BadRequest("width: must be one of " + ", ".join(map(str, config.allowed_widths)))
    if width or height:
        width = width and round(width * dpr)
        height = height and round(height * dpr)
    else:
        vary = vary | {"Sec-CH-Width", "Width"}
        width = _hint_number(request.header("Sec-CH-Width", "Width")[1], 1, 100000)
        width = width and _snap_up(width, config.width_steps)
    screen, vary = _choose_screen(params, request, config, vary)
    if screen:
        screen_width, screen_height = (round(side * dpr) for side in screen)
        alone = width is None and height is None
        width = min(width or screen_width, screen_width)
        if height or (alone and "screensize" in params):
            # a named or given screen alone sizes the image to fit it
            height = min(height or screen_height, screen_height)
    return _clamp(width, config.max_width), _clamp(height, config.max_height), vary


def _choose_screen(params, request, config, vary):
    """The screen in CSS pixels: ?screensize=, else the Viewport-Width hint, else None."""
    if "screensize" in params:
        value = params["screensize"]
        screen = config.screens.get(value) or _parse_screen_size(value)
        if screen is None:
            raise BadRequest("screensize: must be WxH (such as 360x800) or one of "
                             + ", ".join(config.screens))
        return screen, vary
    vary = vary | {"Sec-CH-Viewport-Width", "Viewport-Width"}
    viewport = _hint_number(request.header("Sec-CH-Viewport-Width", "Viewport-Width")[1],
                            1, 100000)
    if viewport is None:
        return None, vary
    return (_snap_up(viewport, config.width_steps), 100000), vary


def _choose_fit(params):
    fit = _choice_param(params, "fit", FITS, None)
    forcefit = _bool_param(params, "forcefit", None)
    if forcefit is not None and fit is not None and forcefit != (fit == "fill"):
        raise BadRequest("forcefit: contradicts fit=" + fit)
    return fit or ("fill" if forcefit else "contain")


def _choose_gravity(params):
    """(gravity, focal point): a name from GRAVITIES or `smart`, with no point; or
    `fp` and the point fp:X,Y gives."""
    value = params.get("gravity", "center")
    if value in GRAVITIES or value == "smart":
        return value, ()
    match = FOCAL_POINT.fullmatch(value)
    point = tuple(float(part) for part in match.groups()) if match else ()
    if not point or not all(0 <= part <= 1 for part in point):
        raise BadRequest("gravity: must be " + PARAMETERS["gravity"])
    return "fp", point


def _choose_format(params, request, config, vary, placeholder=False):
    """(output format, whether an image with alpha goes out as PNG instead, vary):
    format=auto negotiates with Accept (and varies on it); for a placeholder, among
    the auto formats but AVIF (see PLACEHOLDER_SIDE)."""
    if params.get("format") != "auto":
        name = _choice_param(params, "format", FORMATS, config.format)
        if name not in AVAILABLE_FORMATS:
            raise BadRequest(f"format: {name} is not available on this server; one of "
                             + ", ".join(AVAILABLE_FORMATS) + ", auto")
        return name, False, vary
    preferred = config.auto_formats
    if placeholder:
        preferred = tuple(name for name in preferred if name != "avif")
    name = negotiate_format(request.header("Accept")[1] or "", preferred)
    return name, not FORMATS[name][2], vary | {"Accept"}


def _large_answer_format(params, request, config, image_format):
    """Where format=auto chose AVIF, the format a large answer goes out in instead:
    the next auto format the client takes (see AUTO_AVIF_MAX_PIXELS); else ""."""
    if params.get("format") != "auto" or image_format != "avif":
        return ""
    return negotiate_format(request.header("Accept")[1] or "",
                            tuple(name for name in config.auto_formats if name != "avif"))


def _choose_animation_format(params, request, config, image_format):
    """The format an animated source goes out in with all its frames, "" for its
    first frame alone: WebP where the request names it, or where format=auto and
    Accept takes it (before AVIF: animated AVIF is not offered)."""
    if params.get("format") != "auto":
        return "webp" if image_format == "webp" else ""
    accept = request.header("Accept")[1] or ""
    if "webp" in config.auto_formats and negotiate_format(accept, ("webp",)) == "webp":
        return "webp"
    return ""


def _int_param(params, name, low, high, default):
    value = params.get(name)
    if value is None:
        return default
    # ASCII digits only: int() takes any script's, each another spelling of one URL
    if not re.fullmatch(r"[0-9]{1,9}", value) or not low <= int(value) <= high:
        raise BadRequest(f"{name}: must be an integer from {low} to {high}")
    return int(value)


def _number_param(params, name, low, high):
    number = _finite_number(params[name])
    if number is None or not low <= number <= high:
        raise BadRequest(f"{name}: must be a number from {low} to {high}")
    return number


def _choice_param(params, name, table, default):
    value = params.get(name)
    if value is None:
        return default
    if value not in table:
        raise BadRequest(f"{name}: must be one of " + ", ".join(table))
    return value


def _bool_param(params, name, default):
    value = params.get(name)
    if value is None:
        return default
    if value.lower() not in BOOLEANS:
        raise BadRequest(f"{name}: must be one of 1, true, yes, 0, false, no")
    return BOOLEANS[value.lower()]


def _colour_param(params, name, default):
    if name not in params:
        return default
    colour = _parse_colour(params[name])
    if colour is None:
        raise BadRequest(f"{name}: must be a hex colour such as fff or ffffff")
    return colour


def _parse_colour(text):
    """'fff' or '#ffffff' -> 'ffffff'; None if it is not a hex colour."""
    text = text.lstrip("#").lower()
    if re.fullmatch(r"[0-9a-f]{3}", text):
        return "".join(c * 2 for c in text)
    return text if re.fullmatch(r"[0-9a-f]{6}", text) else None


def _parse_screen_size(text):
    match = re.fullmatch(r"([0-9]{1,5})x([0-9]{1,5})", text.strip().lower())
    if not match or "0" in (match[1].lstrip("0") or "0", match[2].lstrip("0") or "0"):
        return None
    return int(match[1]), int(match[2])


def _finite_number(text):
    if not text.isascii():
        return None  # float() takes any script's digits: one spelling of a number only
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _hint_number(text, low, high):
    """A client-hint number, or None when it is absent or malformed (never an error)."""
    if not text or len(text) > 16:
        return None
    number = _finite_number(text)
    return number if number is not None and low <= number <= high else None


def _snap_up(value, steps):
    """The first step at or above value (the last step when value is above them all)."""
    return next((step for step in steps if step >= value), steps[-1])


def _clamp(value, high):
    return None if value is None else max(1, min(int(value), high))


def _printable(text):
    """Text safe to quote in a one-line message: control characters escaped, short."""
    return text[:40].encode("unicode_escape").decode("ascii")


# --- HTTP policy --------------------------------------------------------------


#: Formats every browser shows: format=auto may send them to a client whose Accept
#: does not name them (old browsers send image/* or */* for everything).
UNIVERSAL_FORMATS = ("jpeg", "png")


def negotiate_format(accept, preferred):
    """The first of the `preferred` output formats the client takes: JPEG and PNG
    always, the others only where Accept names their media type with q > 0
    (image/avif;q=0 refuses AVIF; a wildcard takes nothing new). JPEG if none."""
    taken = accepted_types(accept)
    for name in preferred:
        if name in UNIVERSAL_FORMATS or taken.get(FORMATS[name][1], 0) > 0:
            return name
    return "jpeg"


def accepted_types(accept):
    """{media type: q} of the types an Accept header names (q 1 unless it says
    otherwise; the first mention of a type counts)."""
    taken = {}
    for item in accept.split(",")[:100]:
        media, *params = item.split(";")
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                quality = _finite_number(value.strip()) or 0.0
        taken.setdefault(media.strip().lower(), quality)
    return taken


def is_not_modified(if_none_match, etag):
    """Weak comparison of an If-None-Match header with our (strong, quoted) ETag."""
    if not if_none_match:
        return False
    if if_none_match.strip() == "*":
        return True
    tags = (tag.strip() for tag in if_none_match.split(","))
    return any(tag.removeprefix("W/") == etag for tag in tags)


def is_modified_since(if_modified_since, mtime):
    """False when the source is no newer than an If-Modified-Since date (whole seconds)."""
    try:
        since = email.utils.parsedate_to_datetime(if_modified_since).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return True
    return int(mtime) > since


def http_date(timestamp):
    return email.utils.formatdate(timestamp, usegmt=True)


def canonical_request(path, query):
    """What a signature covers: the path under the mount point, '?', then every
    parameter but sig, sorted, percent-encoded (RFC 3986 unreserved kept)."""
    pairs = sorted((name, value) for name, value in
                   urllib.parse.parse_qsl(query, keep_blank_values=True) if name != "sig")
    return path + "?" + urllib.parse.urlencode(pairs, quote_via=urllib.parse.quote, safe="")


def sign(path, query, key):
    """Hex HMAC-SHA256 of the canonical request."""
    # a path that is not UTF-8 is signed as the bytes it was (it is refused later)
    message = canonical_request(path, query).encode("utf-8", "surrogateescape")
    return hmac.new(key.encode("utf-8"), message, hashlib.sha256).hexdigest()


def check_signature(request, config):
    """With signing keys set, every image request must carry a valid sig (any key)."""
    if not config.signing_keys:
        return
    given = [value for name, value in urllib.parse.parse_qsl(request.query) if name == "sig"]
    expected = [sign(request.path or "/", request.query, key) for key in config.signing_keys]
    # bytes, as compare_digest refuses non-ASCII text (a hostile sig must not raise)
    signature = given[0].lower().encode("utf-8") if given else b""
    if not any(hmac.compare_digest(signature, digest.encode()) for digest in expected):
        raise Forbidden("sig: missing or wrong signature")


def check_remote_url(url, config):
    """Refuse a url= whose scheme or host the [remote] policy does not allow."""
    try:
        parts = urllib.parse.urlsplit(url)
        host, _ = (parts.hostname or "").lower(), parts.port  # port: ValueError if bad
    except ValueError:
        raise BadRequest("url: must be an http or https URL") from None
    if parts.scheme not in ("http", "https") or not host:
        raise BadRequest("url: must be an http or https URL")
    if not any(host == allowed or (allowed.startswith("*.") and host.endswith(allowed[1:]))
               for allowed in config.allowed_hosts):
        raise Forbidden("url: this host is not allowed as a remote source")
    return url


def is_public_address(address, allowed_networks=()):
    """Whether an address may be fetched: globally reachable unicast, or in an
    explicitly allowed network. Private, loopback, link-local, shared (100.64/10),
    site-local (fec0::/10), reserved and multicast addresses are refused."""
    address = _embedded_ipv4(ipaddress.ip_address(address.split("%")[0]))
    if any(address in network for network in allowed_networks):
        return True
    site_local = address.version == 6 and address.is_site_local
    return address.is_global and not (address.is_multicast or site_local)


#: IPv6 prefixes whose last 32 bits are an IPv4 address: NAT64's well-known
#: prefix (a gateway reaches it), IPv4-translated and the old IPv4-compatible form.
_EMBEDDING_IPV4 = tuple(ipaddress.ip_network(prefix)
                        for prefix in ("64:ff9b::/96", "::ffff:0:0:0/96", "::/96"))


def may_read_metrics(request, config):
    """Whether a request may read /_metrics: from [metrics] allowed_networks, and not
    relayed by a proxy (whose address would stand for every client's)."""
    if request.header("X-Forwarded-For", "Forwarded")[1] is not None:
        return False
    try:
        address = ipaddress.ip_address(request.remote_addr)
    except ValueError:
        return False
    address = getattr(address, "ipv4_mapped", None) or address
    return any(address in network for network in config.metrics_networks)


def _embedded_ipv4(address):
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, NAT64, translated,
    compatible), else itself."""
    if address.version == 4:
        return address
    if address.ipv4_mapped or address.sixtofour:
        return address.ipv4_mapped or address.sixtofour
    if any(address in prefix for prefix in _EMBEDDING_IPV4):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def confine(root, name):
    """The real path of `name` under `root`; NotFound if it resolves outside it."""
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise NotFound("no such image", f"{name!r} resolves outside the image root")
    return path


# --- image pipeline -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Source:
    """A source (a file under the image root, a remote URL, or an error picture);
    `identity` changes whenever its content may have. `data` is empty until read."""

    path: str
    identity: tuple
    mtime: float
    data: bytes = b""


@dataclasses.dataclass(frozen=True)
class Facts:
    """What the key needs to know of a source, read from its header without decoding:
    its upright size, whether it has transparency, and its EXIF orientation (decided
    here, once: the pipeline applies this one).

    `frames` is how many frames an animation has, counted up to MAX_COUNTED_FRAMES
    + 1 (2 for other sources with more than one picture, such as a TIFF's pages);
    `still_reason` is "" or the code (STILL_REASONS) of why the frames cannot all
    be served whatever the request. `decode_bytes_per_pixel` is what its decode at
    full size takes (see decode_bytes_per_pixel; 12 is a progressive RGB JPEG's)."""

    size: tuple
    alpha: bool
    orientation: int = 1
    frames: int = 1
    still_reason: str = ""
    decode_bytes_per_pixel: int = 12


@dataclasses.dataclass(frozen=True)
class Plan:
    """The output's geometry and format, worked out from the Facts before any pixel
    is decoded; nothing in it is ever larger than max_width x max_height.

    `region` is the part of the upright source shown (cover crops it), resized to
    `size`; `canvas` is the output (larger than `size` only for pad, which places
    the image at `offset` on bg). `frames` is "s" for a still source, the number of
    frames where all go out (an animated WebP), else the code of why only the first
    does (STILL_REASONS).

    `smart` is set when gravity=smart crops: the region's size is known but not its
    place, which the resize step finds on the decoded image (see smart_focus). It
    holds the size the answer itself is resized to: a placeholder is decoded at
    its answer's scale, so both look at the same pixels and show the same region.
    """

    source: tuple
    region: tuple
    size: tuple
    canvas: tuple
    offset: tuple
    format: str
    alpha: bool
    uses_bg: bool
    smart: tuple = ()
    frames: str = "s"


@dataclasses.dataclass(frozen=True)
class Job:
    """One render: the spec, the source's facts and the plan made from them, the
    app's colour transforms, a deadline and the memory it may take."""

    spec: Spec
    facts: Facts
    plan: Plan
    transforms: object
    deadline: float
    max_render_bytes: int = 0
    opened: Optional[tuple] = None  # upright size of the image opened, if not the source's
    draft: bool = True  # a JPEG may decode at a reduced scale


@dataclasses.dataclass(frozen=True)
class Rendered:
    """An encoded image and what it took to make it."""

    data: bytes
    format: str
    width: int
    height: int
    quality: int
    facts: Facts
    plan: Plan
    timings: tuple
    animated: bool = False
    frames: str = ""


def stat_source(spec, config):
    """The named source's identity, from a stat, without reading it (for hits and 304s).
    A remote source's identity is its URL and the refetch period it falls in."""
    if spec.url:
        period = int(time.time()) // config.refetch_after
        return Source(spec.url, ("url", spec.url, period), period * config.refetch_after)
    path = confine(config.image_root, spec.name)
    try:
        stat = os.stat(path)
    except OSError as error:  # missing, a loop of links, a name too long, no access
        raise NotFound("no such image", f"{spec.name!r}: {error.strerror}") from None
    if not os.path.stat.S_ISREG(stat.st_mode):
        raise NotFound("no such image", f"{spec.name!r} is not a regular file")
    return file_source(path, os.path.relpath(path, config.image_root), stat)


def open_source(spec, config):
    """Read the source, refusing oversize files early; a remote one is fetched."""
    if spec.url:
        source = stat_source(spec, config)
        return dataclasses.replace(source, data=fetch_remote(spec.url, config))
    path = confine(config.image_root, spec.name)
    return read_file_source(path, os.path.relpath(path, config.image_root), config)


def file_source(path, name, stat, data=b""):
    """A file as a Source: its identity is the name it goes by, its size and mtime."""
    return Source(path, (name, stat.st_size, stat.st_mtime_ns), stat.st_mtime, data)


def read_file_source(path, name, config):
    """A file read whole, its identity from the fstat of the open file (so it matches
    the bytes read); NotFound for anything that is not a readable regular file."""
    try:
        with open(path, "rb") as file:
            stat = os.fstat(file.fileno())
            if not os.path.stat.S_ISREG(stat.st_mode):
                raise NotFound("no such image", f"{path!r} is not a regular file")
            if stat.st_size > config.max_source_bytes:
                raise Unprocessable("source is larger than max_source_bytes")
            data = file.read(config.max_source_bytes + 1)
    except OSError as error:
        raise NotFound("no such image", f"{path!r}: {error.strerror}") from None
    if len(data) > config.max_source_bytes:
        raise Unprocessable("source is larger than max_source_bytes")
    return file_source(path, name, stat, data)


def fetch_remote(url, config):
    """GET a remote source safely: allowed hosts only, each resolved once and checked
    (globally reachable addresses only, unless allowed), connected to by that checked
    address, redirects re-checked, body capped, the whole fetch within total_timeout."""
    deadline = time.monotonic() + config.total_timeout
    for _ in range(config.max_redirects + 1):
        parts = urllib.parse.urlsplit(check_remote_url(url, config))
        address = _checked_address(parts, config)
        connection, response = _PinnedConnection(parts, address, config, deadline), None
        try:
            response = _remote_get(connection, parts)
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                url = urllib.parse.urljoin(url, response.getheader("Location"))
                continue
            if response.status == 404:
                raise NotFound("no such image", f"remote {url} answered 404")
            if response.status != 200:
                raise BadGateway("remote source answered with an error",
                                 f"remote {url} answered {response.status}")
            return _read_capped(response, connection, config)
        finally:
            if response is not None:
                response.close()  # it may own the socket now
            connection.finish()
    raise BadGateway("remote source redirects too often")


def _checked_address(parts, config):
    try:
        infos = socket.getaddrinfo(parts.hostname, _port(parts), type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise BadGateway("remote host does not resolve") from None
    address = infos[0][4][0]
    if not is_public_address(address, config.allowed_networks):
        raise Forbidden("url: the remote host's address is not allowed")
    return address


def _port(parts):
    """A URL's port, or its scheme's."""
    return parts.port or (443 if parts.scheme == "https" else 80)


def _remote_get(connection, parts):
    """One GET over a connection to the address already checked (no second lookup)."""
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request("GET", path, headers={"User-Agent": f"dynimg/{VERSION}",
                                                 "Accept": "image/*"})
        return connection.getresponse()
    except (OSError, http.client.HTTPException) as error:
        raise _remote_failure(connection, error) from None


def _read_capped(response, connection, config):
    declared = response.getheader("Content-Length")
    if declared and declared.isdigit() and int(declared) > config.max_source_bytes:
        raise Unprocessable("source is larger than max_source_bytes")
    chunks, total = [], 0
    try:
        while chunk := response.read1(65536):
            if connection.expired:
                # the socket is shut, but Linux still hands over bytes that keep coming
                break
            total += len(chunk)
            if total > config.max_source_bytes:
                raise Unprocessable("source is larger than max_source_bytes")
            chunks.append(chunk)
    except (OSError, http.client.HTTPException) as error:
        raise _remote_failure(connection, error) from None
    if connection.expired:
        raise GatewayTimeout("remote source timed out", "remote source exceeded total_timeout")
    return b"".join(chunks)


def _remote_failure(connection, error):
    """The HTTPError for a failed remote exchange: a timeout (a read, or the whole
    fetch's deadline) is 504, anything else 502."""
    if connection.expired or isinstance(error, TimeoutError):
        return GatewayTimeout("remote source timed out", repr(error))
    return BadGateway("remote source is unreachable", repr(error))


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to a fixed, checked address, with the URL's host name
    for Host and TLS (so DNS cannot be asked twice and answer differently).

    Every read has read_timeout, and a timer shuts the socket at the fetch's overall
    deadline: an origin that sends a byte now and then cannot hold a thread longer."""

    def __init__(self, parts, address, config, deadline):
        super().__init__(parts.hostname, _port(parts), timeout=config.read_timeout)
        self.address, self.tls = address, parts.scheme == "https"
        self.connect_timeout, self.deadline = config.connect_timeout, deadline
        self.expired, self.timer, self.socket = False, None, None

    def connect(self):
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            self.expired = True
            raise TimeoutError("total_timeout reached")
        sock = socket.create_connection((self.address, self.port),
                                        min(self.connect_timeout, remaining))
        sock.settimeout(self.timeout)
        if self.tls:
            # wrapped before the handshake, so the timer can shut the socket the
            # handshake reads from (wrapping takes the plain socket's descriptor)
            sock = ssl.create_default_context().wrap_socket(
                sock, server_hostname=self.host, do_handshake_on_connect=False)
        # kept here too: http.client drops self.sock once a response owns it
        self.sock = self.socket = sock
        self.timer = threading.Timer(self.deadline - time.monotonic(), self._expire)
        self.timer.daemon = True
        self.timer.start()
        if self.tls:
            sock.do_handshake()

    def _expire(self):
        self.expired = True
        try:
            self.socket.shutdown(socket.SHUT_RDWR)  # wakes a blocked read, which then ends
        except OSError:
            pass  # closed already

    def finish(self):
        """Close, and stop the deadline's timer. (close() alone is not the end: http.client
        calls it as soon as it hands the socket over to a response that closes it.)"""
        if self.timer:
            self.timer.cancel()
        self.close()


class RenderSlots:
    """At most max_concurrent_renders renders at once in this process, and at most
    max_waiting_renders waiting for one: a render that finds the queue full, or gets
    no slot within queue_timeout, is turned away (503). So load cannot pile up
    memory, and a flood of renders cannot hold every thread: the rest serve hits."""

    def __init__(self, count, timeout, max_waiting):
        self.semaphore = threading.BoundedSemaphore(count)
        self.timeout, self.max_waiting = timeout, max_waiting
        self.waiting, self.lock = 0, threading.Lock()

    def __enter__(self):
        if self.semaphore.acquire(blocking=False):
            return
        with self.lock:
            if self.waiting >= self.max_waiting:
                raise Busy("busy: try again shortly")
            self.waiting += 1
        try:
            if not self.semaphore.acquire(timeout=self.timeout):
                raise Busy("busy: try again shortly")
        finally:
            with self.lock:
                self.waiting -= 1

    def __exit__(self, *exc_info):
        self.semaphore.release()


class LRU:
    """A small thread-safe mapping that forgets its least recently used entries."""

    def __init__(self, size):
        self.size, self.items, self.lock = size, collections.OrderedDict(), threading.Lock()

    def get(self, key, make=None):
        """The value kept for key; else make()'s (made outside the lock, then kept),
        or None without make."""
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        if make is None:
            return None
        value = make()
        self.put(key, value)
        return value

    def put(self, key, value):
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)

    def __len__(self):
        return len(self.items)


class _HeaderBudget:
    """A source as Pillow's open() reads it: at most MAX_HEADER_READS reads and
    MAX_HEADER_BYTES bytes until `spent()` is called, once the header is parsed. A
    read of the whole rest is not header parsing (the WebP and AVIF decoders take
    the file at once), so it is not counted."""

    def __init__(self, file):
        self.file, self.reads, self.bytes, self.counting = file, 0, 0, True

    def read(self, size=-1):
        data = self.file.read(size)
        if self.counting and size is not None and size >= 0:
            self.reads, self.bytes = self.reads + 1, self.bytes + len(data)
            if self.reads > MAX_HEADER_READS or self.bytes > MAX_HEADER_BYTES:
                raise Unprocessable("source has an oversized header",
                                    f"header past {self.reads} reads, {self.bytes} bytes")
        return data

    def spent(self):
        self.counting = False

    def __getattr__(self, name):
        return getattr(self.file, name)


def open_image(file, config):
    """Open (lazily) with the allowed decoders only, the header parsed within its
    budget, and check the pixel count before any pixel is decoded. `file` is a
    binary file or the source's bytes."""
    budget = _HeaderBudget(io.BytesIO(file) if isinstance(file, bytes) else file)
    try:
        image = Image.open(budget, formats=config.input_formats)
    except UnidentifiedImageError:
        raise Unprocessable("source is not an image in a format this server reads: "
                            + " ".join(config.input_formats).lower()) from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
            RuntimeError) as error:  # the AVIF plugin's decoder reports a broken container so
        raise Unprocessable("source is not a decodable image", repr(error)) from None
    budget.spent()
    if image.width * image.height > config.max_source_pixels:
        raise Unprocessable("source is larger than max_source_pixels")
    return image


def probe_file(path, config):
    """The Facts of a source file, from its header alone (Pillow opens lazily); an
    animation's blocks are walked to count its frames."""
    try:
        with open(path, "rb") as file:
            image = open_image(file, config)
            data = b""
            if _has_frames_to_count(image):
                file.seek(0)
                data = file.read(config.max_source_bytes + 1)
            return facts_of(image, data)
    except OSError as error:
        raise NotFound("no such image", f"{path!r}: {error.strerror}") from None


def facts_of(image, data=b""):
    """Upright size, transparency and frames of an opened (not decoded) image;
    `data` is the source's bytes (an animation's frames are counted in them)."""
    width, height = image.size
    orientation = _orientation(image)
    upright = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    alpha = (image.mode in ("RGBA", "LA", "PA", "La", "RGBa")
             or "transparency" in image.info)
    facts = Facts(upright, alpha, orientation,
                  decode_bytes_per_pixel=decode_bytes_per_pixel(image))
    if not _has_frames_to_count(image):
        if _is_animated(image):  # a TIFF's pages, say: its first alone goes out
            return dataclasses.replace(facts, frames=2, still_reason="a")
        return facts
    scan = scan_frames(image, data)
    if len(scan.durations) < 2 and not scan.problem:
        return facts
    # an animation is at least two frames, however few could be read
    return dataclasses.replace(facts, frames=max(2, len(scan.durations)),
                               still_reason=scan.problem)


def _has_frames_to_count(image):
    """Whether the source's frames are counted by scan_frames(): an animated WebP or
    APNG (their headers say so), and every GIF (Pillow's is_animated walks a GIF's
    first frame, sub-block by sub-block, in Python: unbounded)."""
    return image.format == "GIF" or (image.format in ANIMATED_FORMATS and _is_animated(image))


@dataclasses.dataclass(frozen=True)
class FrameScan:
    """An animation's frames as its blocks describe them, nothing decoded: how long
    each is shown (ms, as browsers show them), how many of Pillow's frames come
    before the animation (an APNG's default image), and "" or the code
    (STILL_REASONS) of what keeps the frames from being served."""

    durations: tuple
    skip: int = 0
    problem: str = ""


class _Unscannable(Exception):
    """An animation's blocks end early, or go on past MAX_SCANNED_BLOCKS."""


def scan_frames(image, data):
    """The FrameScan of an animated GIF, WebP or APNG, from its bytes: bounded by
    MAX_COUNTED_FRAMES and MAX_SCANNED_BLOCKS, whatever the file claims."""
    try:
        durations, skip, problem = FRAME_SCANNERS[image.format](image, data)
    except (_Unscannable, IndexError, struct.error):
        return FrameScan((), 0, "x")
    shown = tuple(SHOWN_FOR_SHORTEST_MS if ms <= SHORTEST_FRAME_MS else min(ms, LONGEST_FRAME_MS)
                  for ms in durations)
    return FrameScan(shown, skip, problem)


def _gif_frames(image, data):
    """A GIF's blocks: each frame's delay from the graphic control extension before
    it; a frame reaching past the canvas (Pillow would grow the canvas, so every
    frame after it) or a byte that starts no block ends the scan."""
    durations, delay, blocks = [], 0, 0
    flags = data[10]
    position = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # the global palette
    while position < len(data) and data[position] != 0x3B:  # the trailer
        if len(durations) > MAX_COUNTED_FRAMES:
            break
        if data[position] == 0x21:  # an extension: 0xF9 gives the next frame's delay
            if data[position + 1] == 0xF9 and data[position + 2] >= 4:
                delay = struct.unpack_from("<H", data, position + 4)[0] * 10
            position += 2
        elif data[position] == 0x2C:  # a frame: its extent, palette, LZW code size
            left, top, width, height, flags = struct.unpack_from("<4HB", data, position + 1)
            if left + width > image.width or top + height > image.height:
                return durations, 0, "o"
            position += 11 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
            durations.append(delay)
            delay = 0
        else:
            return durations, 0, "x"
        position, blocks = _after_sub_blocks(data, position, blocks)
    return durations, 0, ""


def _after_sub_blocks(data, position, blocks):
    """The position after a run of GIF sub-blocks (each a length byte and that many
    bytes; a 0 ends the run), and the blocks walked so far, at most MAX_SCANNED_BLOCKS."""
    while True:
        blocks += 1
        if blocks > MAX_SCANNED_BLOCKS:
            raise _Unscannable()
        if not data[position]:
            return position + 1, blocks
        position += data[position] + 1


def _webp_frames(image, data):
    """An animated WebP's ANMF chunks (libwebp checked the file when it opened)."""
    durations, position = [], 12
    for _ in range(MAX_SCANNED_BLOCKS):
        if position + 8 > len(data) or len(durations) > MAX_COUNTED_FRAMES:
            break
        kind, size = struct.unpack_from("<4sI", data, position)
        if kind == b"ANMF":  # X, Y, width and height (3 bytes each), then the duration
            durations.append(int.from_bytes(data[position + 20:position + 23], "little"))
        position += 8 + size + (size & 1)
    else:
        raise _Unscannable()
    expected = min(image.n_frames, MAX_COUNTED_FRAMES + 1)
    return durations, 0, "" if len(durations) == expected else "x"


def _png_frames(image, data):
    """An APNG's fcTL chunks, as many as its acTL declares (Pillow's n_frames, which
    counts a default image shown before the animation as one more)."""
    durations, skip, position, seen_image = [], 0, 8, False
    for _ in range(MAX_SCANNED_BLOCKS):
        if position + 8 > len(data) or len(durations) > MAX_COUNTED_FRAMES:
            break
        length, kind = struct.unpack_from(">I4s", data, position)
        if kind == b"fcTL":
            width, height, left, top, numerator, denominator = struct.unpack_from(
                ">4I2H", data, position + 12)
            if left + width > image.width or top + height > image.height:
                return durations, skip, "x"  # Pillow refuses such a frame
            skip = skip or int(seen_image and not durations)
            durations.append(numerator * 1000 // (denominator or 100))
        seen_image = seen_image or kind == b"IDAT"
        if kind == b"IEND":
            break
        position += 12 + length
    else:
        raise _Unscannable()
    declared = min(image.n_frames - skip, MAX_COUNTED_FRAMES + 1)
    return durations[:declared], skip, "" if len(durations) >= declared else "x"


#: How each animated format's frames are counted, by Pillow's format name.
FRAME_SCANNERS = {"GIF": _gif_frames, "WEBP": _webp_frames, "PNG": _png_frames}


def plan_output(facts, spec, config):
    """The output's geometry and format for a source with these Facts (see Plan)."""
    width, height = facts.size
    region = (0, 0, width, height)
    if spec.fit == "fill" and spec.width and spec.height:
        size = (spec.width, spec.height)
    elif spec.fit == "cover" and spec.width and spec.height:
        size, region = _cover(facts.size, spec)
    else:
        size = _contain(facts.size, spec, (config.max_width, config.max_height))
    canvas, offset = size, (0, 0)
    if spec.fit == "pad":
        canvas = (spec.width or size[0], spec.height or size[1])
        # smart and fp crop; they place a padded image as center does
        across, down = GRAVITIES.get(spec.gravity, GRAVITIES["center"])
        offset = (round((canvas[0] - size[0]) * across), round((canvas[1] - size[1]) * down))
    smart = size if spec.gravity == "smart" and _crops(region, facts.size) else ()
    if spec.placeholder:
        size, canvas, offset = _placeholder_geometry(size, canvas, offset)
    output_format = spec.format
    if output_format == "avif" and spec.large_answer_format and _avif_too_large(
            facts, canvas, config):
        output_format = spec.large_answer_format
    # a negotiated format without alpha gives way to PNG for a source with alpha
    if facts.alpha and not FORMATS[output_format][2] and (
            spec.png_for_alpha or output_format != spec.format):
        output_format = "png"
    frames = _plan_frames(facts, spec, config, canvas)
    if frames.isdigit():
        output_format = spec.animation_format
    # a placeholder is flattened onto bg in any format: alpha would cost more bytes
    # than the picture, and under a blur a background colour shows the same; an
    # animation keeps alpha (a frame may clear what the first one showed)
    alpha = (facts.alpha or frames.isdigit()) and FORMATS[output_format][2] and (
        not spec.placeholder)
    uses_bg = (facts.alpha and not alpha) or canvas != size
    return Plan(facts.size, region, size, canvas, offset, output_format, alpha, uses_bg,
                smart, frames)


def _avif_too_large(facts, canvas, config):
    """Whether a negotiated AVIF answer of this canvas is past AUTO_AVIF_MAX_PIXELS,
    or would, with the decode of a source of this size, take more than max_render_mb
    (as WebP it takes a third)."""
    pixels = canvas[0] * canvas[1]
    source_bytes = facts.size[0] * facts.size[1] * facts.decode_bytes_per_pixel
    answer_bytes = pixels * (ANSWER_BYTES_PER_PIXEL + ENCODER_BYTES_PER_PIXEL["avif"])
    return (pixels > AUTO_AVIF_MAX_PIXELS
            or source_bytes + answer_bytes > config.max_render_mb * 1024 * 1024)


def _plan_frames(facts, spec, config, canvas):
    """Plan.frames: "s" for a still source; the frame count, where every frame goes
    out (within max_frames, and max_animation_pixels counting each frame at the
    source's size or the output's, whichever is larger); else the code of why the
    first frame alone does (STILL_REASONS)."""
    if facts.frames < 2:
        return "s"
    if spec.placeholder or not spec.animation_format:
        return "a"
    if facts.still_reason:
        return facts.still_reason
    if facts.frames > config.max_frames:
        return "n"
    frame_pixels = max(facts.size[0] * facts.size[1], canvas[0] * canvas[1])
    if facts.frames * frame_pixels > config.max_animation_pixels:
        return "p"
    return str(facts.frames)


def _placeholder_geometry(size, canvas, offset):
    """The answer's geometry scaled down so the canvas's longest side is at most
    PLACEHOLDER_SIDE: the same framing, a few hundred bytes."""
    scale = PLACEHOLDER_SIDE / max(canvas)
    if scale >= 1:
        return size, canvas, offset
    return (tuple(_whole_pixels(side * scale) for side in size),
            tuple(_whole_pixels(side * scale) for side in canvas),
            tuple(round(side * scale) for side in offset))


def _contain(size, spec, limits):
    """The whole source scaled into the box (or left as it is), and always within
    the output limits, whatever its aspect and whatever upscale allows."""
    width, height = size
    scales = [side / source for side, source in ((spec.width, width), (spec.height, height))
              if side]
    scale = min(scales) if scales else 1.0
    if not spec.upscale:
        scale = min(scale, 1.0)
    scale = min(scale, limits[0] / width, limits[1] / height)
    return (min(_whole_pixels(width * scale), limits[0]),
            min(_whole_pixels(height * scale), limits[1]))


def _cover(size, spec):
    """(output size, region): the box filled by the part of the source that gravity
    keeps. Only that part is resampled, so the scaled whole (for a 940x2 source in a
    4000x4000 box, 1,880,000x4000 px) is never made."""
    width, height = size
    scale = max(spec.width / width, spec.height / height)
    if not spec.upscale:
        scale = min(scale, 1.0)
    whole = (_whole_pixels(width * scale), _whole_pixels(height * scale))
    output = (min(spec.width, whole[0]), min(spec.height, whole[1]))
    shown = (width * output[0] / whole[0], height * output[1] / whole[1])
    if spec.gravity == "fp":
        return output, region_around(spec.focal_point, size, shown)
    # smart is centred until its point is found, after decoding
    across, down = GRAVITIES.get(spec.gravity, GRAVITIES["center"])
    left, top = (width - shown[0]) * across, (height - shown[1]) * down
    return output, (left, top, left + shown[0], top + shown[1])


def region_around(point, size, shown):
    """The region of `shown` size centred on `point` (fractions of `size`), as far as
    the image allows: moved inside it where the point is near an edge."""
    # floats throughout, as the other gravities' regions (the key writes 0.0, not 0)
    left, top = (min(max(fraction * whole - part / 2, 0.0), max(whole - part, 0.0))
                 for fraction, whole, part in zip(point, size, shown))
    return (left, top, left + shown[0], top + shown[1])


def _crops(region, size):
    """Whether the region leaves out more than a thousandth of a pixel of the source."""
    left, top, right, bottom = region
    return right - left < size[0] - 1e-3 or bottom - top < size[1] - 1e-3


def _whole_pixels(length):
    """Round half up (266.5 -> 267, as people expect), and never below 1 px."""
    return max(1, math.floor(length + 0.5))


def image_key(spec, plan, identity):
    """Hex digest of everything that decides the output's bytes, and of nothing else:
    a parameter that changes nothing for this source (bg on an opaque image, upscale
    or gravity the plan does not use, a box side that does not bind) adds no key."""
    lossy = plan.format in LOSSY_FORMATS
    fields = {
        "version": PROCESSING_VERSION,
        "source": list(identity),
        "region": [round(side, 3) for side in plan.region],
        "size": list(plan.size),
        "canvas": list(plan.canvas),
        "offset": list(plan.offset),
        "format": plan.format,
        "quality": spec.quality if lossy else None,
        "min_quality": spec.min_quality if lossy and spec.max_bytes else None,
        "max_bytes": spec.max_bytes,
        "progressive": spec.progressive if plan.format == "jpeg" else None,
        "bg": spec.bg if plan.uses_bg else None,
        "copyright": spec.keep_copyright,
        "palette": spec.png_palette if plan.format == "png" else None,
    }
    if plan.smart:
        # the region's place is found after decoding, the same every time; the
        # field is only there when smart crops, so other keys stay as they were
        fields["smart"] = True
    if plan.frames != "s":  # an animated source: all its frames, or why the first alone
        fields["frames"] = plan.frames
    canonical = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def render(source_data, spec, config, transforms=None):
    """Open, plan, decode, run the pipeline, encode within budget: a Rendered.

    Only opening and decoding can fail on the source's account (422); whatever
    fails after that is a bug of the server's own (500)."""
    started = time.perf_counter()
    image = open_image(source_data, config)
    return render_opened(image, facts_of(image, source_data), source_data, spec, config,
                         transforms, started)


def render_opened(image, facts, source_data, spec, config, transforms=None, started=None,
                  draft=True):
    """render() of an image already opened (a source, or a master standing in for
    its source with the source's Facts; a master decodes at full scale, see
    App._from_master)."""
    started = time.perf_counter() if started is None else started
    plan = plan_output(facts, spec, config)
    upright = image.size[::-1] if facts.orientation in (5, 6, 7, 8) else image.size
    job = Job(spec, facts, plan,
              LRU(TRANSFORM_CACHE_SIZE) if transforms is None else transforms,
              time.monotonic() + config.max_render_seconds, config.max_render_mb * 1024 * 1024,
              upright, draft)
    copyright_line = _copyright(image, spec)
    source = image = decode(image, job, source_data)
    decoded = time.perf_counter()
    for step in PIPELINE:
        image = step(image, job)
    resized = time.perf_counter()
    if plan.frames.isdigit():  # the later frames are decoded and resized as they are encoded
        data, image, quality, frames = encode_animation(image, source, job, source_data,
                                                        copyright_line)
    else:
        (data, image, quality), frames = encode(image, job, copyright_line), plan.frames
    finished = time.perf_counter()
    timings = (("decode", decoded - started), ("resize", resized - decoded),
               ("encode", finished - resized))
    return Rendered(data, plan.format, image.width, image.height, quality, facts, plan,
                    timings, facts.frames > 1, frames)


def _is_animated(image):
    """Whether the source has frames after the first, as Pillow says (a GIF's are
    counted by scan_frames instead). The further pictures of a multi-picture JPEG
    (previews, depth maps) are no frames."""
    if image.format == "MPO":
        return False
    try:
        animated = getattr(image, "is_animated", False)
    except (OSError, SyntaxError, ValueError, EOFError):
        animated = True  # a second frame exists but is broken: frame one still serves
    try:
        image.seek(0)
    except (OSError, EOFError, ValueError):
        pass
    return animated


def _copyright(image, spec):
    """The source's EXIF copyright line, where the config keeps it."""
    if not spec.keep_copyright:
        return None
    value = _exif_tag(image, EXIF_COPYRIGHT)
    return str(value).strip("\x00 ")[:200] or None if value else None


def _orientation(image):
    """The EXIF orientation, 1 when absent, invalid or unreadable (never an error).
    Only EXIF found without decoding counts (a PNG's eXIf after its pixel data would
    make Pillow decode the whole image first)."""
    value = _exif_tag(image, EXIF_ORIENTATION)
    return value if value in ORIENTATIONS else 1


#: IFD0 entries read, at most (cameras write a few dozen).
MAX_EXIF_ENTRIES = 256


def _exif_tag(image, tag):
    """One tag of the source's IFD0 (an int, or text), None when absent or unreadable.

    Read by hand from the raw EXIF, one entry at a time: Pillow's reader copies every
    tag's data, so a few kB of tags all pointing at one large range took gigabytes.
    A TIFF's own tags were read, within the header budget, when it was opened."""
    if hasattr(image, "tag_v2"):
        return image.tag_v2.get(tag)
    raw = image.info.get("exif") or b""
    raw = raw[6:] if raw.startswith(b"Exif\x00\x00") else raw
    if raw[:4] not in (b"II*\x00", b"MM\x00*"):
        return None
    order = "<" if raw[:2] == b"II" else ">"
    try:
        ifd = struct.unpack_from(order + "I", raw, 4)[0]
        for index in range(min(struct.unpack_from(order + "H", raw, ifd)[0], MAX_EXIF_ENTRIES)):
            entry = ifd + 2 + 12 * index
            number, kind, count = struct.unpack_from(order + "HHI", raw, entry)
            if number == tag:
                return _exif_value(raw, order, entry, kind, count)
    except struct.error:  # cut short: as if absent
        return None
    return None


def _exif_value(raw, order, entry, kind, count):
    """A SHORT or LONG entry's first value, an ASCII entry's text (up to 256 bytes)."""
    if kind == 3:
        return struct.unpack_from(order + "H", raw, entry + 8)[0]
    if kind == 4:
        return struct.unpack_from(order + "I", raw, entry + 8)[0]
    if kind == 2:
        start = entry + 8 if count <= 4 else struct.unpack_from(order + "I", raw, entry + 8)[0]
        return raw[start:start + min(count, 256)].split(b"\x00")[0].decode("latin-1")
    return None


#: What Pillow raises for a broken file, once it reads pixels.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError)


def decode(image, job, data):
    """Shrink-on-load (JPEG DCT scaling to about the planned scale), judge the cost,
    then decode. A broken file fails here, the one step that may: 422."""
    plan = job.plan
    if image.format in ("JPEG", "MPO") and job.draft:  # an MPO: a JPEG, more pictures after
        left, top, right, bottom = plan.region
        size = plan.smart or plan.size  # a smart placeholder: at its answer's scale
        # the whole source at the scale its region is shown at
        width = math.ceil(plan.source[0] * size[0] / (right - left) * DRAFT_FACTOR)
        height = math.ceil(plan.source[1] * size[1] / (bottom - top) * DRAFT_FACTOR)
        if job.facts.orientation in (5, 6, 7, 8):
            width, height = height, width
        image.draft(None, (width, height))
    _check_cost(image, job, data)
    # the source is in memory already: hand it to the decoder whole, not in 64 KiB
    # pieces (each piece a suspension and resumption of libjpeg; 1-3 % faster)
    image.decodermaxblock = max(image.decodermaxblock, MAX_DECODER_BLOCK)
    # Pillow reports broken files through these, and only once it reads pixels; the
    # AVIF plugin raises RuntimeError for frames its decoder cannot decode
    broken = DECODE_ERRORS + (
        (RuntimeError,) if image.format == "AVIF" else ())
    try:
        image.load()
    except broken as error:
        raise Unprocessable(f"source is a {image.format} file this server cannot decode",
                            repr(error)) from None
    return image


def _check_cost(image, job, data):
    """Refuse (422) a render (source and answer) that would take more than
    max_render_mb, or a JPEG with more than MAX_JPEG_SCANS scans, judged before any
    pixel is decoded."""
    needed = _render_bytes(image, job, data)
    if needed > job.max_render_bytes:
        raise Unprocessable("source and answer would take more than max_render_mb to render",
                            f"{image.format} {image.mode} {image.size} to "
                            f"{job.plan.format} {job.plan.canvas}: {needed} bytes")


def _render_bytes(image, job, data):
    """The memory a render of this source takes (of one frame), from its header,
    and, for a still answer, of the answer and its encoder."""
    plan = job.plan
    source_pixels = plan.source[0] * plan.source[1]
    if image.format in ("JPEG", "MPO"):
        # 0xFFDA starts a scan; inside coded data 0xFF is always followed by 0 or RSTn
        if data.count(b"\xff\xda") > MAX_JPEG_SCANS:
            raise Unprocessable(f"source has more than {MAX_JPEG_SCANS} JPEG scans")
        # its pixels at the (DCT-scaled) size it is decoded at, its coefficients at full
        needed = image.width * image.height * RENDER_BYTES_PER_PIXEL.get(image.mode, 12)
        if _is_progressive(image):
            needed += source_pixels * len(image.getbands()) * JPEG_COEFFICIENT_BYTES
    else:
        if image.format == "AVIF":
            # the AV1 frames are decoded at their own size, whatever the header says
            source_pixels = max(source_pixels, av1_frame_pixels(data))
        needed = source_pixels * decode_bytes_per_pixel(image)
    # an animation too: where it cannot go out whole, its first frame goes out still
    # (encode_animation adds the animation encoder's memory)
    return needed + plan.canvas[0] * plan.canvas[1] * (
        ANSWER_BYTES_PER_PIXEL + ENCODER_BYTES_PER_PIXEL[plan.format])


def decode_bytes_per_pixel(image):
    """The memory an opened source's decode takes a pixel, at its full size: its
    pixels, or its decoder's planes where they take more, a transparent colour made
    alpha, a progressive JPEG's coefficients."""
    per_pixel = RENDER_BYTES_PER_PIXEL.get(image.mode, 12)
    if image.format in ("JPEG", "MPO"):
        if _is_progressive(image):
            per_pixel += len(image.getbands()) * JPEG_COEFFICIENT_BYTES
        return per_pixel
    per_pixel = max(per_pixel, DECODER_BYTES_PER_PIXEL.get(image.format, 0))
    if "transparency" in image.info:
        per_pixel += TRANSPARENCY_BYTES_PER_PIXEL
    return per_pixel


def _is_progressive(image):
    """Whether an opened JPEG is progressive (Pillow names it both ways)."""
    return bool(image.info.get("progressive") or image.info.get("progression"))


#: Items and extents, all counted together, an AVIF container may have (a photo
#: has a few; a grid of 256 tiles, a few hundred); boxes at one level, likewise.
MAX_AVIF_ITEMS = 4096

#: OBUs an AV1 item may hold (a still picture has a handful: a temporal delimiter,
#: a sequence header, perhaps metadata, a frame or a frame header and tile groups).
MAX_AV1_OBUS = 256


def av1_frame_pixels(data):
    """The pixels an AVIF file's AV1 frames decode to, from their sequence headers:
    the largest frame's, or half of all frames' (a picture and its alpha frame, or
    a grid's tiles and theirs, count as one picture), whichever is more.

    The size Pillow reports is the container's (ispe); the decoder makes each AV1
    frame at the size its own sequence header gives, up to 16384x16384, and then
    scales it to the container's: a 1 kB file saying 100x100 decoded a 6000x6000
    frame. So every OBU of every AV1 item is walked (its extents joined, as the
    decoder joins them) and the largest sequence header counts. An AV1 item with no
    sequence header, a container that cannot be read this way and an image
    sequence (a track's frames are not items) are a 422."""
    data = memoryview(data)
    try:
        if _box(data, 0, len(data), b"moov") is not None:
            raise Unprocessable("source is an AVIF image sequence, which this server does "
                                "not read")
        meta = _box(data, 0, len(data), b"meta")
        if meta is None:
            raise ValueError("no meta box")
        start, end = meta[0] + 4, meta[1]  # a full box: version and flags first
        iloc, iinf = _box(data, start, end, b"iloc"), _box(data, start, end, b"iinf")
        idat = _box(data, start, end, b"idat")
        if iloc is None or iinf is None:
            raise ValueError("no iloc or iinf box")
        av1_items = {item for item, kind in _item_types(data, *iinf) if kind == b"av01"}
        largest = total = 0
        for item, method, extents in _item_extents(data, *iloc):
            if item not in av1_items:
                continue
            if method not in (0, 1) or (method == 1 and idat is None):
                raise ValueError(f"item {item} is stored where it cannot be read")
            base = idat[0] if method == 1 else 0
            limit = idat[1] if method == 1 else len(data)
            pieces = [data[base + offset:limit if length == 0 else base + offset + length]
                      for offset, length in extents]
            width, height = _av1_frame_size(b"".join(pieces) if len(pieces) > 1
                                            else pieces[0])
            largest, total = max(largest, width * height), total + width * height
        return max(largest, total // 2)
    except (struct.error, ValueError, IndexError) as error:
        raise Unprocessable("source is an AVIF file this server cannot check",
                            repr(error)) from None


def _box(data, start, end, kind):
    """(payload start, end) of the first ISO-BMFF box of this kind in data[start:end]."""
    for _ in range(MAX_AVIF_ITEMS):
        if start + 8 > end:
            return None
        size, found = struct.unpack_from(">I4s", data, start)
        header = 8
        if size == 1:
            size, header = struct.unpack_from(">Q", data, start + 8)[0], 16
        elif size == 0:
            size = end - start
        if size < header or start + size > end:
            raise ValueError(f"box {found!r} overruns its parent")
        if found == kind:
            return start + header, start + size
        start += size
    raise ValueError(f"more than {MAX_AVIF_ITEMS} boxes")


def _item_types(data, start, end):
    """(item ID, item type) of each infe box (versions 2 and 3) of an iinf box."""
    count_size = 2 if data[start] == 0 else 4
    position = start + 4 + count_size
    for _ in range(min(_uint(data, start + 4, count_size), MAX_AVIF_ITEMS)):
        entry = _box(data, position, end, b"infe")
        if entry is None:
            return
        version = data[entry[0]]
        if version >= 2:
            id_size = 2 if version == 2 else 4
            item = _uint(data, entry[0] + 4, id_size)
            yield item, bytes(data[entry[0] + 6 + id_size:entry[0] + 10 + id_size])
        position = entry[1]


def _item_extents(data, start, end):
    """(item ID, construction method, [(offset, length), ...]) of each item of an iloc
    box; offsets include the item's base offset, a length of 0 means "to the end"."""
    version = data[start]
    position = start + 4
    offset_size, length_size = data[position] >> 4, data[position] & 15
    base_size = data[position + 1] >> 4
    index_size = data[position + 1] & 15 if version in (1, 2) else 0
    position += 2
    id_size = 4 if version == 2 else 2
    count = _uint(data, position, id_size)
    position += id_size
    parts = count
    if parts > MAX_AVIF_ITEMS:
        raise ValueError(f"{count} items")
    for _ in range(count):
        item = _uint(data, position, id_size)
        position += id_size
        method = 0
        if version in (1, 2):
            method = _uint(data, position, 2) & 15
            position += 2
        position += 2  # data_reference_index
        base = _uint(data, position, base_size)
        position += base_size
        count_of_extents = _uint(data, position, 2)
        position += 2
        parts += count_of_extents
        if parts > MAX_AVIF_ITEMS:
            raise ValueError(f"more than {MAX_AVIF_ITEMS} items and extents")
        extents = []
        for _ in range(count_of_extents):
            position += index_size
            offset = _uint(data, position, offset_size)
            length = _uint(data, position + offset_size, length_size)
            position += offset_size + length_size
            extents.append((base + offset, length))
        if position > end:
            raise ValueError("iloc overruns its box")
        if not extents:
            raise ValueError(f"item {item} has no data")
        yield item, method, extents


def _uint(data, position, size):
    if position + size > len(data):
        raise ValueError("cut short")
    return int.from_bytes(data[position:position + size], "big")


def _av1_frame_size(item):
    """The largest (width, height) of the sequence headers among an AV1 item's OBUs."""
    item = memoryview(item)
    position, largest = 0, None
    for _ in range(MAX_AV1_OBUS):
        if position >= len(item):
            if largest is None:
                raise ValueError("an AV1 item without a sequence header")
            return largest
        header = item[position]
        kind, extension, has_size = header >> 3 & 15, header >> 2 & 1, header >> 1 & 1
        if header & 0x80:
            raise ValueError("an OBU with its forbidden bit set")
        position += 1 + extension
        size, length = _leb128(item, position) if has_size else (len(item) - position, 0)
        position += length
        if position + size > len(item):
            raise ValueError("an OBU overruns its item")
        if kind == 1:  # a sequence header: its fields end within a few hundred bytes
            size_found = _sequence_header_size(_Bits(item[position:position + min(size, 512)]))
            if largest is None or size_found[0] * size_found[1] > largest[0] * largest[1]:
                largest = size_found
        position += size
    raise ValueError(f"more than {MAX_AV1_OBUS} OBUs in an item")


def _leb128(data, position):
    value = 0
    for index in range(8):
        byte = data[position + index]
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            return value, index + 1
    raise ValueError("leb128 too long")


class _Bits:
    """Reads an AV1 header most significant bit first."""

    def __init__(self, data):
        self.data, self.position = data, 0

    def read(self, count):
        value = 0
        for _ in range(count):
            byte = self.data[self.position >> 3]  # IndexError when cut short
            value = value << 1 | (byte >> (7 - (self.position & 7)) & 1)
            self.position += 1
        return value

    def uvlc(self):
        zeros = 0
        while not self.read(1):
            zeros += 1
            if zeros >= 32:
                raise ValueError("uvlc too long")
        return self.read(zeros) + (1 << zeros) - 1


def _sequence_header_size(bits):
    """max_frame_width and max_frame_height of an AV1 sequence header (spec 5.5.1)."""
    bits.read(3)  # seq_profile
    bits.read(1)  # still_picture
    if bits.read(1):  # reduced_still_picture_header
        bits.read(5)
    else:
        model_info = False
        if bits.read(1):  # timing_info_present_flag
            bits.read(32), bits.read(32)
            if bits.read(1):  # equal_picture_interval
                bits.uvlc()
            model_info = bits.read(1)
            if model_info:
                delay_length = bits.read(5) + 1
                bits.read(32), bits.read(5), bits.read(5)
        display_delay = bits.read(1)
        for _ in range(bits.read(5) + 1):  # operating points
            bits.read(12)
            if bits.read(5) > 7:
                bits.read(1)
            if model_info and bits.read(1):
                bits.read(delay_length), bits.read(delay_length), bits.read(1)
            if display_delay and bits.read(1):
                bits.read(4)
    width_bits, height_bits = bits.read(4) + 1, bits.read(4) + 1
    return bits.read(width_bits) + 1, bits.read(height_bits) + 1


def orient(image, job):
    """Apply the EXIF orientation, so width and height mean the upright image."""
    transpose = ORIENTATIONS.get(job.facts.orientation)
    return image.transpose(transpose) if transpose is not None else image


def to_srgb(image, job):
    """Bring any mode and embedded profile to sRGB (or grey) 8-bit, keeping alpha."""
    profile = image.info.get("icc_profile")
    image = _to_working_mode(image)
    if profile and image.mode in ("RGB", "RGBA", "CMYK", "L", "LA"):
        image = _apply_profile(image, profile, job.transforms)
    if image.mode == "CMYK":
        image = image.convert("RGB")
    return image


#: Modes the pipeline works in, and how each other mode gets there.
_WORKING_MODES = {"1": "L", "PA": "RGBA", "La": "LA", "RGBa": "RGBA",
                  "RGBX": "RGB", "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB"}


def _to_working_mode(image):
    if image.mode in ("LA", "RGBA", "CMYK"):
        return image
    if "transparency" in image.info and image.mode in ("L", "RGB", "P", "1"):
        # a tRNS colour becomes a real alpha channel, so it can be resized and flattened
        return image.convert("LA" if image.mode in ("L", "1") else "RGBA")
    if image.mode in ("L", "RGB"):
        return image
    if image.mode == "P":
        return image.convert("RGB")
    if image.mode.startswith("I") or image.mode == "F":
        return _grey_to_8_bits(image)
    return image.convert(_WORKING_MODES.get(image.mode, "RGB"))


def _grey_to_8_bits(image):
    """16- and 32-bit grey scaled (not clipped) to 8 bits, keeping a tRNS grey as alpha."""
    high = 65535 if image.mode.startswith("I;16") or image.getextrema()[1] > 255 else 255
    grey = image.convert("I").point(lambda value: value * (255 / high)).convert("L")
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):
        # Pillow's own conversion drops a 16-bit tRNS: build the mask by comparison
        opaque = ImageMath.lambda_eval(lambda values: values["grey"] != values["clear"],
                                       grey=image.convert("I"), clear=transparent)
        grey.putalpha(opaque.point(lambda value: value * 255).convert("L"))
    return grey


def _apply_profile(image, profile_bytes, transforms):
    """Convert from an embedded ICC profile to sRGB; an unusable profile is ignored."""
    alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") else None
    base = image.convert(image.mode[:-1]) if alpha else image
    try:
        transform = _srgb_transform(profile_bytes, base.mode, transforms)
    except (ImageCms.PyCMSError, OSError, ValueError) as error:
        log.info("ignoring an unusable ICC profile: %s", error)
        return image
    if transform is None:
        return image
    converted = ImageCms.applyTransform(base, transform)
    if base.mode == "L":
        # a grey profile maps to neutral sRGB: keep one channel
        converted = converted.convert("L")
    if alpha:
        converted.putalpha(alpha)
    return converted


_SRGB_PROFILE = ImageCms.createProfile("sRGB")


def _srgb_transform(profile_bytes, mode, transforms):
    """The transform from this profile to sRGB, built once per profile and kept in
    the app's LRU; None when none is needed."""
    def build():
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile_bytes))
        space = source.profile.xcolor_space.strip()
        expected = {"L": "GRAY", "RGB": "RGB", "CMYK": "CMYK"}[mode]
        if space != expected or _is_srgb(source):
            return None
        return ImageCms.buildTransform(source, _SRGB_PROFILE, mode, "RGB",
                                       renderingIntent=ImageCms.Intent.PERCEPTUAL)
    return transforms.get((hashlib.sha1(profile_bytes).digest(), mode), build)


def _is_srgb(profile):
    description = (profile.profile.profile_description or "").lower()
    return "srgb" in description


def resize(image, job):
    """One resample of the planned region to the planned size (premultiplied alpha,
    done by Pillow). A decoded image smaller than the source (JPEG draft) has the
    region scaled to it."""
    plan = job.plan
    if image.size == plan.size and plan.region == (0, 0) + plan.source:
        return image
    (across, down), (pad_left, pad_top) = _decoded_scale(image, job)
    left, top, right, bottom = shown_region(image, plan)
    return image.resize(plan.size, Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP,
                        box=(pad_left + left * across, pad_top + top * down,
                             pad_left + right * across, pad_top + bottom * down))


def _decoded_scale(image, job):
    """((across, down), (left, top)): how upright source pixels map onto the decoded
    image. A JPEG decoded at 1/s is ceil(side / s) pixels, its last pixel only part
    source: the source spans side / s of them, and its pixels sit at exactly 1/s.
    Scaling by the decoded size instead stretched the picture by up to 7/8 pixel
    across it, which scored up to 30 SSIMULACRA2 points lower on sharp photos. Where
    orienting flipped an axis, that part pixel is at its start."""
    width, height = job.plan.source
    opened = job.opened or job.plan.source  # a master is smaller than its source
    for scale in JPEG_SCALES:
        if image.size == tuple(-(-side // scale) for side in opened):
            flipped = FLIPPED_AXES[job.facts.orientation]
            return (opened[0] / width / scale, opened[1] / height / scale), tuple(
                (decoded - side / scale) if flip else 0.0
                for decoded, side, flip in zip(image.size, opened, flipped))
    return (image.width / width, image.height / height), (0.0, 0.0)


#: The scales a JPEG decodes at (draft): 1/1, 1/2, 1/4 and 1/8.
JPEG_SCALES = (1, 2, 4, 8)


def _flipped_axes(transpose):
    """(x, y): whether the upright image runs against the stored one on each axis,
    found by where the stored image's last pixel lands."""
    probe = Image.new("L", (2, 2))
    probe.putpixel((1, 1), 1)
    if transpose is not None:
        probe = probe.transpose(transpose)
    x, y = next((x, y) for x in (0, 1) for y in (0, 1) if probe.getpixel((x, y)))
    return x == 0, y == 0


#: EXIF orientation -> _flipped_axes of its transpose.
FLIPPED_AXES = {orientation: _flipped_axes(ORIENTATIONS.get(orientation))
                for orientation in range(1, 9)}


def shown_region(image, plan):
    """The part of the upright source shown: the plan's region, or for smart, one of
    its size around the point smart_focus finds in this (decoded, upright) image."""
    if not plan.smart:
        return plan.region
    left, top, right, bottom = plan.region
    return region_around(smart_focus(image, plan.source), plan.source,
                         (right - left, bottom - top))


#: gravity=smart looks at a copy of the upright image this many pixels on its longest
#: side, sized from the source's size (not the decoded image's), so that any decoded
#: scale (a JPEG draft, a placeholder's) gives nearly the same copy.
SMART_SIDE = 256

#: What draws the eye, per level of the copy (lookup tables for Image.point): edges
#: of luma (the 3x3 Laplacian, doubled); chroma (saturation x value) above 96; skin
#: (hue 3-50 degrees, saturation 20-63 %, value from 39 %), at half weight; and
#: nothing where luma is under 24 (dark areas). bench/crops.py measured these.
SMART_EDGES = [min(255, 2 * level) for level in range(256)]
SMART_CHROMA = [max(0, level - 96) * 255 // 159 for level in range(256)]
SMART_SKIN_HUE = [255 if 2 <= level <= 36 else 0 for level in range(256)]
SMART_SKIN_SATURATION = [255 if 50 <= level <= 160 else 0 for level in range(256)]
SMART_SKIN_VALUE = [128 if level >= 100 else 0 for level in range(256)]
SMART_LIT = [255 if level >= 24 else 0 for level in range(256)]

#: The blur that turns the map into regions (a 16th of the copy's longest side), and
#: the weight of each place by its nearness to the centre (all of it at the centre, 29 %
#: at the middle of an edge, none in the corners): a photo's subject is near the centre
#: more often than not, and a background of leaves or sky should not pull it away.
SMART_BLUR = SMART_SIDE / 16
SMART_CENTRE = Image.radial_gradient("L").point(lambda distance: 255 - distance)


def smart_focus(image, source):
    """gravity=smart: the point of the upright image that draws the eye, as fractions
    of its width and height: the maximum of a blurred map of edges, chroma and skin,
    weighted towards the centre (libvips's attention strategy, plus the centre).
    Deterministic: the same image gives the same point."""
    scale = SMART_SIDE / max(source)
    grid = (max(1, round(source[0] * scale)), max(1, round(source[1] * scale)))
    copy = image.resize(grid, Image.Resampling.BOX).convert("RGB")
    luma = copy.convert("L")
    hue, saturation, value = copy.convert("HSV").split()
    skin = ImageChops.multiply(ImageChops.multiply(
        hue.point(SMART_SKIN_HUE), saturation.point(SMART_SKIN_SATURATION)),
        value.point(SMART_SKIN_VALUE))
    edges = luma.filter(ImageFilter.FIND_EDGES).point(SMART_EDGES)
    # the filter leaves the outermost pixels as they were (luma, not edges)
    ImageDraw.Draw(edges).rectangle((0, 0, grid[0] - 1, grid[1] - 1), outline=0)
    drawn = ImageChops.add(ImageChops.add(
        edges, ImageChops.multiply(saturation, value).point(SMART_CHROMA)), skin)
    drawn = ImageChops.multiply(drawn, luma.point(SMART_LIT))
    drawn = ImageChops.multiply(drawn.filter(ImageFilter.GaussianBlur(SMART_BLUR)),
                                SMART_CENTRE.resize(grid, Image.Resampling.BILINEAR))
    highest = drawn.getextrema()[1]
    # the middle of the places that reach the maximum (a plateau in 8 bits)
    left, top, right, bottom = drawn.point(lambda level: 255 * (level >= highest)).getbbox()
    return (left + right) / 2 / grid[0], (top + bottom) / 2 / grid[1]


def pad(image, job):
    """`pad`: the resized image placed on a canvas of bg, at the planned offset."""
    plan = job.plan
    if plan.canvas == image.size:
        return image
    mode = image.mode if image.mode in ("RGB", "RGBA") else "RGBA"
    canvas = Image.new(mode, plan.canvas, "#" + job.spec.bg)
    with_alpha = image.convert("RGBA")
    canvas.paste(with_alpha, plan.offset, with_alpha)
    return canvas


def flatten(image, job):
    """Put transparent pixels on bg where the output keeps no alpha (its format has
    none, or it is a placeholder)."""
    if image.mode not in ("RGBA", "LA") or job.plan.alpha:
        return image
    background = Image.new("RGB", image.size, "#" + job.spec.bg)
    background.paste(image, mask=image.getchannel("A"))
    if image.mode == "LA" and len(set(bytes.fromhex(job.spec.bg))) == 1:
        return background.convert("L")
    return background


#: The image work after decoding, in order; each step is (image, job) -> image.
PIPELINE = (orient, to_srgb, resize, pad, flatten)


def encode(image, job, copyright_line=None):
    """Encode, then keep within the byte budget: lower quality down to the class's
    min_quality (a palette, for PNG), then let the width give way at that quality;
    the search stops at max_render_seconds with what it has.

    Width and quality are chosen together this way: measured with SSIMULACRA2 at
    the layout width (bench/delivery.py), below about 60 on JPEG's scale a narrower
    image at 60 looks better in the same bytes than a wider one at less, so the
    budgeted classes keep 60 as their floor. (In-process scores tried for this,
    luma SSIM and fits of SSIM and edge terms, picked worse than the floor.)

    Returns (bytes, the image encoded, the quality used).
    """
    spec, output_format = job.spec, job.plan.format
    # nothing of the source's metadata (EXIF, XMP, ICC, comments) goes out
    image.info = {"exif": _copyright_exif(copyright_line)} if copyright_line else {}
    lossy = output_format in LOSSY_FORMATS
    if spec.max_bytes and not lossy:
        image = _scaled_to_pixels(image, spec.max_bytes * PNG_PIXELS_PER_BUDGET_BYTE)
    palette = spec.png_palette
    size = _probed_size(image, output_format, spec) if spec.max_bytes and lossy else None
    if size is None:
        data = _save(image, output_format, spec, spec.quality, palette)
        if not spec.max_bytes or len(data) <= spec.max_bytes:
            return data, image, spec.quality
        size = len(data)
    quality = spec.quality
    if lossy:
        data, quality, size = _search_quality(image, output_format, spec, size)
    elif not palette:
        palette = True
        data = _save(image, output_format, spec, quality, palette)
        size = len(data)
    if size > spec.max_bytes and min(image.size) > 16:
        data, image, size = _fit_width(image, data, size, output_format, spec, quality,
                                       palette, job.deadline)
    if data is None:  # the quality search only predicted, and no scaling step came
        data = _save(image, output_format, spec, quality, palette)
        size = len(data)
    if size > spec.max_bytes:
        log.warning("cannot fit %s into %d bytes: sending %d bytes at %dx%d",
                    spec.name or spec.url, spec.max_bytes, size, image.width, image.height)
    return data, image, quality


def encode_animation(first, source, job, data, copyright_line=None):
    """Every frame of an animated source as one animated WebP, each frame decoded,
    run through the pipeline and encoded in turn (see _Frames), with its duration
    and the loop count: (bytes, the first frame, quality, frames as Plan.frames).

    Where the animation cannot go out, its first frame does, as encode() makes it
    within the byte budget, and frames is the code of why: over the budget (the
    first frame alone is already, or the whole animation), past max_render_seconds,
    or a frame that cannot be decoded."""
    spec, canvas = job.spec, job.plan.canvas

    def still(code):
        return (*encode(first, job, copyright_line), code)
    encoder_bytes = canvas[0] * canvas[1] * ANIMATION_ENCODER_BYTES_PER_PIXEL
    if _render_bytes(source, job, data) + encoder_bytes > job.max_render_bytes:
        return still("m")
    if spec.max_bytes and len(_save(first, "webp", spec, spec.quality)) > spec.max_bytes:
        return still("b")  # no animation is smaller than its first frame
    scan, loop = scan_frames(source, data), _loop_count(source)
    first = first.copy() if first is source else first  # the encoder seeks the source
    indices = range(scan.skip, scan.skip + len(scan.durations))
    exif = _copyright_exif(copyright_line) if copyright_line else b""
    try:
        head = _frame(source, job, indices[0]) if scan.skip else first
        head.info = {}
        encoded = _save_animation(head, _Frames(source, job, indices[1:]), scan.durations,
                                  loop, spec, exif)
    except _StillFrame as stopped:
        return still(stopped.code)
    if spec.max_bytes and len(encoded) > spec.max_bytes:
        return still("b")
    return encoded, head, spec.quality, job.plan.frames


def _save_animation(head, rest, durations, loop, spec, exif):
    """Encode an animated WebP: `head` and the frames of `rest`, shown for `durations`."""
    buffer = io.BytesIO()
    head.save(buffer, "WEBP", save_all=True, append_images=[rest], duration=list(durations),
              loop=loop, quality=encoder_quality("webp", spec.quality),
              method=WEBP_ANIMATION_METHOD, minimize_size=WEBP_ANIMATION_MINIMIZE, exif=exif)
    return buffer.getvalue()


def _loop_count(source):
    """How many times the animation plays, as WebP counts (0 for ever, at most
    MAX_LOOP_COUNT). A GIF's NETSCAPE count is of the plays after the first (browsers
    play n + 1 times), and a GIF without one plays once."""
    loop = source.info.get("loop")
    if source.format == "GIF":
        loop = 1 if loop is None else loop + 1 if 0 < loop < MAX_LOOP_COUNT else loop
    return min(loop or 0, MAX_LOOP_COUNT)


class _StillFrame(Exception):
    """The animation cannot go out whole; `code` (STILL_REASONS) says why."""

    def __init__(self, code):
        super().__init__(code)
        self.code = code


def _frame(source, job, index):
    """Frame `index` of a decoded source, composited onto the full canvas by Pillow's
    reader and run through the pipeline as the first was. Raises _StillFrame past
    the render's deadline, or where the frame cannot be decoded."""
    if time.monotonic() > job.deadline:
        raise _StillFrame("t")
    try:
        source.seek(index)
        source.load()
    except DECODE_ERRORS as error:
        log.info("frame %d of %s cannot be decoded: %r", index, job.spec.name or job.spec.url,
                 error)
        raise _StillFrame("x") from None
    frame = source
    for step in PIPELINE:
        frame = step(frame, job)
    return frame.copy() if frame is source else frame  # the next seek changes the source


class _Frames:
    """Frames of a decoded source as Pillow's animated WebP encoder takes the ones
    after the first: an image with n_frames and seek() (Pillow's append_images takes
    multi-frame images), whose other attributes are those of the frame sought. Each
    frame is made by _frame() when sought and dropped at the next seek, so at most
    one full-size frame is held at a time, however many there are."""

    def __init__(self, source, job, indices):
        self.source, self.job, self.indices = source, job, indices
        self.n_frames, self.current = len(indices), None

    def seek(self, index):
        self.current = None  # free the last frame before making the next
        self.current = _frame(self.source, self.job, self.indices[index])

    def __getattr__(self, name):
        return getattr(self.current, name)


def _fit_width(full, data, size, output_format, spec, quality, palette, deadline):
    """(bytes, image, size) of the widest scaled copy of `full` that fits the budget
    at this quality, in a few encodes. Each guess follows bytes ~ scale ** exponent
    from the narrowest encode known too large, the exponent measured on the image as
    it goes; a copy that fits well under the budget is followed by a wider guess.
    `data` is None where `size` was only predicted. Nothing fitting within
    BUDGET_SCALE_STEPS encodes, the last (smallest) one is returned."""
    exponent = BYTES_BY_SCALE_EXPONENT
    high = (1.0, size)  # the narrowest scale known too large, and its bytes
    # (bytes, image) of the widest copy known to fit, at fitting_scale; until one
    # fits, of the latest encode
    fitting_scale, answer = 0.0, (data, full)
    for _ in range(BUDGET_SCALE_STEPS):
        if time.monotonic() > deadline or (
                fitting_scale and len(answer[0]) >= spec.max_bytes * BUDGET_CLOSE_ENOUGH):
            break
        scale = high[0] * min(0.95, (spec.max_bytes * BUDGET_AIM / high[1]) ** (1 / exponent))
        if scale <= fitting_scale * 1.02:  # no wider guess left between the two
            break
        image = _scaled(full, scale)
        encoded = _save(image, output_format, spec, quality, palette)
        # how this image's bytes follow its scale, from the two nearest encodes
        if 0 < len(encoded) < high[1]:
            exponent = min(3.0, max(1.0, math.log(high[1] / len(encoded))
                                    / math.log(high[0] / scale)))
        if len(encoded) <= spec.max_bytes:
            fitting_scale, answer = scale, (encoded, image)
        else:
            high = (scale, len(encoded))
            if not fitting_scale:
                answer = (encoded, image)
            if min(image.size) <= 16:
                break
    data, image = answer
    return data, image, size if data is None else len(data)


def _probed_size(image, output_format, spec):
    """The bytes a large budgeted answer is predicted to take at its quality, from
    an encode of a small copy, when even the prediction least over the budget is
    over it (so the whole image is not encoded at a quality that cannot fit); None,
    to encode it whole, otherwise."""
    pixels = image.width * image.height
    if pixels < BUDGET_PROBE_MIN_PIXELS or (
            spec.max_bytes > pixels * BUDGET_PROBE_MAX_BYTES_PER_PIXEL):
        return None
    scale = math.sqrt(BUDGET_PROBE_PIXELS / pixels)
    probe = len(_save(_scaled(image, scale), output_format, spec, spec.quality))
    if probe * scale ** -BYTES_BY_SCALE_LOWEST <= spec.max_bytes:
        return None
    return round(probe * scale ** -BYTES_BY_SCALE_EXPONENT)


def _scaled(image, scale):
    """The image resized by `scale`, keeping what encode() put in its info."""
    smaller = image.resize((max(1, round(image.width * scale)),
                            max(1, round(image.height * scale))), Image.Resampling.LANCZOS)
    smaller.info = image.info
    return smaller


def _scaled_to_pixels(image, pixels):
    """The image, scaled down to at most this many pixels."""
    if image.width * image.height <= pixels:
        return image
    return _scaled(image, math.sqrt(pixels / (image.width * image.height)))


def _search_quality(image, output_format, spec, first_size):
    """The highest quality that fits the budget, in a few encodes: each guess reads
    the typical bytes-by-quality curve from the nearest encode known too large.

    Returns (bytes or None, quality, their size); bytes are None when even
    min_quality is predicted too large (the caller scales down without them).
    """
    curve = QUALITY_CURVES[output_format]
    high, high_size = spec.quality, first_size  # the lowest quality known too large
    best = None  # (quality, bytes) the highest quality known to fit
    for _ in range(QUALITY_SEARCH_ENCODES):
        floor = best[0] + 1 if best else spec.min_quality
        if floor >= high:
            break
        quality = _predict_quality(curve, high, high_size, spec.max_bytes * BUDGET_AIM, floor)
        if quality is None:
            if best:
                break
            # even the floor is predicted well over: the scale-down step takes over
            predicted = high_size * _curve_at(curve, floor) / _curve_at(curve, high)
            if predicted > spec.max_bytes / BUDGET_AIM:
                return None, floor, round(predicted)
            quality = floor
        data = _save(image, output_format, spec, quality)
        if len(data) <= spec.max_bytes:
            best = (quality, data)
            if len(data) >= spec.max_bytes * BUDGET_CLOSE_ENOUGH:
                break
        else:
            high, high_size = quality, len(data)
    if best:
        return best[1], best[0], len(best[1])
    if high == spec.min_quality:
        return None, high, high_size
    data = _save(image, output_format, spec, spec.min_quality)
    return data, spec.min_quality, len(data)


def _predict_quality(curve, known_quality, known_size, aim, floor):
    """The highest quality from `floor` below `known_quality` whose size, scaled from
    the known one along the curve, is within `aim` (None if none is)."""
    for quality in range(known_quality - 1, floor - 1, -1):
        if known_size * _curve_at(curve, quality) / _curve_at(curve, known_quality) <= aim:
            return quality
    return None


def _curve_at(curve, quality):
    """Relative bytes at a quality, interpolated between the curve's 5-step points."""
    low = max(5, min(95, quality - quality % 5))
    high = min(100, low + 5)
    weight = (quality - low) / 5
    return curve[low] * (1 - weight) + curve[high] * weight


@contextlib.contextmanager
def _own_scheduling():
    """Keep the calling thread's scheduling policy: SVT-AV1, where it may (as root),
    makes the thread that encodes real-time (SCHED_FIFO), and it stayed so after the
    encode: every later render on that thread would starve the rest of its core, and
    every process started from it (Apache, under the tests) inherited the policy."""
    policy, parameters = os.sched_getscheduler(0), os.sched_getparam(0)
    try:
        yield
    finally:
        if os.sched_getscheduler(0) != policy:
            os.sched_setscheduler(0, policy, parameters)


def encoder_quality(output_format, quality):
    """The encoder's quality setting that looks like JPEG at `quality` (the scale
    every profile and URL speaks), read from QUALITY_EQUIVALENTS."""
    table = QUALITY_EQUIVALENTS.get(output_format)
    if table is None:
        return quality
    points = sorted(table.items())
    for (low, low_value), (high, high_value) in zip(points, points[1:]):
        if quality <= high:
            weight = (quality - low) / (high - low)
            return max(1, min(100, round(low_value + (high_value - low_value) * weight)))
    return points[-1][1]


def _copyright_exif(copyright_line):
    exif = Image.Exif()
    exif[EXIF_COPYRIGHT] = copyright_line
    return exif.tobytes()


def _save(image, output_format, spec, quality, palette=False):
    """Encode with settings per format (chosen in bench/encoding.py); the only
    metadata written is what encode() put in image.info."""
    buffer = io.BytesIO()
    exif = image.info.get("exif", b"")
    pixels = image.width * image.height
    small = pixels <= PNG_OPTIMIZE_MAX_PIXELS
    small_answer = pixels <= SMALL_ANSWER_PIXELS
    if output_format == "png":
        if palette:
            alpha = image.mode in ("RGBA", "LA")
            # median cut (better colours) for RGB up to 1 Mpx; fast octree otherwise,
            # which needs RGB or RGBA
            image = image.convert("RGBA" if alpha else "RGB").quantize(
                256, method=Image.Quantize.MEDIANCUT if small and not alpha
                else Image.Quantize.FASTOCTREE)
        image.save(buffer, "PNG", exif=exif, **({"optimize": True} if small else
                                                {"compress_level": PNG_LARGE_COMPRESS_LEVEL}))
    elif output_format == "webp":
        image.save(buffer, "WEBP", quality=encoder_quality("webp", quality),
                   method=WEBP_SMALL_ANSWER_METHOD if small_answer else WEBP_METHOD,
                   exif=exif)
    elif output_format == "avif":
        codec, speed = AVIF_ENCODER
        if codec == "svt" and min(image.size) < SVT_MIN_SIDE and AVIF_TINY_ENCODER:
            codec, speed = AVIF_TINY_ENCODER
        if small_answer:
            speed = AVIF_SMALL_ANSWER_SPEEDS.get(codec, speed)
        # one thread: renders already run side by side, one a core; 4:2:0 for grey
        # images too, as SVT-AV1 cannot encode monochrome (4:0:0)
        with _own_scheduling():
            image.save(buffer, "AVIF", quality=encoder_quality("avif", quality),
                       codec=codec, speed=speed, max_threads=1, subsampling="4:2:0",
                       exif=exif)
        release_freed_memory()
    else:
        image.save(buffer, "JPEG", quality=quality, optimize=True, exif=exif,
                   progressive=spec.progressive
                   and image.width * image.height >= PROGRESSIVE_MIN_PIXELS,
                   subsampling="4:4:4" if quality >= FULL_CHROMA_QUALITY else "4:2:0")
    return buffer.getvalue()


# --- masters: a large source decoded once -------------------------------------
#
# A page asks for many variants of one photo (widths, classes, formats, densities),
# and each miss used to decode the whole source again: 75-95 % of a render on a
# large or progressive JPEG. A master is the source made small once (upright, sRGB,
# MASTER_SIDE on its long side, a near-lossless JPEG) and kept in the result cache
# beside the answers; later misses it has pixels enough for decode it instead.

#: A master's longest side, in pixels. Answers made from a 2048 px master scored
#: within 0.5 SSIMULACRA2 of the same answers made from the source, at every width
#: a master may serve (bench/masters.py).
MASTER_SIDE = 2048

#: A master's JPEG quality (with full-resolution chroma): what its answers lose to
#: it is below what a person can see (bench/masters.py).
MASTER_QUALITY = 95

#: An answer is made from the master only where the master has at least this many
#: pixels across the shown region for each pixel of the answer, on both axes.
MASTER_MARGIN = 1.0

#: Sources below this many pixels get no master: they decode in a few ms.
MASTER_MIN_PIXELS = 6_000_000

#: Baseline JPEGs decode fast with DCT scaling: below this many pixels a master
#: saves nothing (bench/masters.py); progressive ones and other formats pay from
#: MASTER_MIN_PIXELS.
MASTER_MIN_BASELINE_PIXELS = 12_000_000

#: A master's JPEG comment: the upright size of its source and what its decode
#: takes a pixel, which the plans of the answers made from it need (a remote
#: source's may be known from nothing else). A master without them is made again.
MASTER_COMMENT = re.compile(
    rb"dynimg master of ([0-9]{1,6})x([0-9]{1,6}), decoded at ([0-9]{1,3}) bytes a pixel")


def master_key(identity):
    """The cache key of a source's master: its identity and how masters are made, so a
    changed source, or a change of MASTER_SIDE or quality, makes a new one."""
    fields = {"master": [MASTER_SIDE, MASTER_QUALITY, PROCESSING_VERSION],
              "source": list(identity)}
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def master_pays(image, facts):
    """Whether a source (opened, not decoded) is worth a master: large, opaque, one
    frame, and slow to decode (see MASTER_MIN_BASELINE_PIXELS)."""
    pixels = facts.size[0] * facts.size[1]
    if facts.alpha or pixels < MASTER_MIN_PIXELS or facts.frames > 1:
        return False
    if image.format in ("JPEG", "MPO") and not _is_progressive(image):
        return pixels >= MASTER_MIN_BASELINE_PIXELS
    return True


def master_size(facts):
    """A master's size for a source with these Facts."""
    scale = min(1.0, MASTER_SIDE / max(facts.size))
    return tuple(_whole_pixels(side * scale) for side in facts.size)


def master_serves(plan, size):
    """Whether a master of this size has pixels enough for the planned answer."""
    left, top, right, bottom = plan.region
    across = (right - left) * size[0] / plan.source[0]
    down = (bottom - top) * size[1] / plan.source[1]
    return across >= plan.size[0] * MASTER_MARGIN and down >= plan.size[1] * MASTER_MARGIN


def make_master(image, facts, source_data, config, transforms):
    """A source's master as JPEG bytes, from the source opened (not decoded): the
    same decode and pipeline as any render, so orientation, colour profiles and the
    memory limit apply; its copyright line is kept for the answers that keep it."""
    size = master_size(facts)
    plan = Plan(facts.size, (0, 0) + facts.size, size, size, (0, 0), "jpeg", False, False)
    job = Job(MASTER_SPEC, facts, plan, transforms,
              time.monotonic() + config.max_render_seconds, config.max_render_mb * 1024 * 1024)
    copyright_line = _copyright(image, MASTER_SPEC)
    image = decode(image, job, source_data)
    for step in PIPELINE:
        image = step(image, job)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=MASTER_QUALITY, subsampling="4:4:4",
               exif=_copyright_exif(copyright_line) if copyright_line else b"",
               comment=b"dynimg master of %dx%d, decoded at %d bytes a pixel"
               % (facts.size + (facts.decode_bytes_per_pixel,)))
    return buffer.getvalue()


def open_master(data, config):
    """(image opened, the Facts of its source) of a master's bytes; Unprocessable if
    they are not a master."""
    image = open_image(data, config)
    found = MASTER_COMMENT.fullmatch(image.info.get("comment") or b"")
    if image.format != "JPEG" or not found:
        raise Unprocessable("not a master")
    # a master is upright and opaque already: nothing of the source's EXIF applies
    return image, Facts((int(found[1]), int(found[2])), False, 1,
                        decode_bytes_per_pixel=int(found[3]))


#: The spec a master is made with: its own size, near-lossless, the copyright kept.
MASTER_SPEC = Spec(name="", width=None, height=None, fit="fill", gravity="center",
                   upscale=False, format="jpeg", png_for_alpha=False, quality=MASTER_QUALITY,
                   min_quality=MASTER_QUALITY, max_bytes=0, progressive=False, bg="ffffff",
                   keep_copyright=True)


# --- result cache -------------------------------------------------------------

#: A hit refreshes its entry's mtime (the LRU clock) at most this often, in seconds.
TOUCH_INTERVAL = 3600

#: Pruning trims the cache to this fraction of cache_max_mb, so it does not run at once again.
PRUNE_TO = 0.9

#: The unit a file takes on disk: the cache's bound counts blocks, not lengths
#: (a 300-byte answer takes 4 KiB).
DISK_BLOCK = 4096

#: The cache's figures as of its last trim (entries and bytes on disk), so /_health
#: never walks the disk.
FIGURES_FILE = ".figures.json"


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """An encoded result on disk; everything a response needs is in its file name,
    with a CRC-32 of the content checked on every hit:
    KEY.SOURCE.WxH.qQUALITY.FRAMES.LENGTH.CRC.FORMAT

    FRAMES is `frames` where set (a Rendered's: the frame count of an animated
    answer, or the code of why an animated source gave its first frame), else "a"
    for an animated source and "s" for a still one."""

    key: str
    source: str
    width: int
    height: int
    quality: int
    animated: bool
    length: int
    crc: int
    format: str
    frames: str = ""

    @property
    def name(self):
        frames = self.frames or ("a" if self.animated else "s")
        return (f"{self.key}.{self.source}.{self.width}x{self.height}.q{self.quality}."
                f"{frames}.{self.length}.{self.crc:08x}.{self.format}")

    @classmethod
    def parse(cls, name):
        try:
            key, source, size, quality, frames, length, crc, fmt = name.split(".")
            width, height = size.split("x")
            return cls(key, source, int(width), int(height), int(quality[1:]), frames != "s",
                       int(length), int(crc, 16), fmt, frames)
        except ValueError:
            return None

    @classmethod
    def of(cls, key, source, rendered):
        return cls(key, source, rendered.width, rendered.height, rendered.quality,
                   rendered.animated, len(rendered.data), zlib.crc32(rendered.data),
                   rendered.format, rendered.frames)


def source_tag(name):
    """Short digest naming a source in cache file names, so purge can find its variants."""
    return hashlib.sha256(name.encode()).hexdigest()[:12]


def _disk_bytes(length):
    return -(-length // DISK_BLOCK) * DISK_BLOCK


class ResultCache:
    """Encoded results under cache_dir by image key: atomic writes, checksums,
    LRU trimming by disk blocks."""

    def __init__(self, config):
        self.folder = config.cache_dir
        self.max_bytes = config.cache_max_mb * 1024 * 1024
        self.fsync = config.cache_fsync
        self.lock_timeout = config.lock_timeout
        self.counts = collections.Counter()  # hits, misses, damaged: this process's
        self.written = 0
        self.last_prune = time.monotonic()
        self.pruning = threading.Lock()
        self.failures_logged = set()  # errnos already warned of, until a write succeeds

    def _folder_of(self, key):
        return os.path.join(self.folder, key[:2], key[2:4])

    def lookup(self, key):
        """(entry, open file) for a sound cached result, else None; a damaged file
        (wrong length or checksum) is removed."""
        folder = self._folder_of(key)
        try:
            names = [name for name in os.listdir(folder) if name.startswith(key + ".")]
        except OSError:
            return None
        entries = [entry for entry in map(CacheEntry.parse, names)
                   if entry and entry.format in FORMATS]
        if not entries:
            return None
        entry = entries[0]
        path = os.path.join(folder, entry.name)
        try:
            file = open(path, "rb")
        except OSError:
            return None
        stat = os.fstat(file.fileno())
        if not self._is_sound(file, stat, entry):
            file.close()
            log.warning("removing a damaged cache file %s", path)
            self.counts["damaged"] += 1
            self._remove(path)
            return None
        if time.time() - stat.st_mtime > TOUCH_INTERVAL:
            try:
                os.utime(file.fileno())  # the LRU clock
            except OSError:
                pass  # a read-only cache still serves
        return entry, file

    @staticmethod
    def _is_sound(file, stat, entry):
        """Whether the file has the length and the checksum its name records; the
        file is left at its start."""
        if stat.st_size != entry.length:
            return False
        crc = 0
        while chunk := file.read(262144):
            crc = zlib.crc32(chunk, crc)
        file.seek(0)
        return crc == entry.crc

    def store(self, entry, data):
        """Write atomically (a temporary file in the same folder, then rename)."""
        folder = self._folder_of(entry.key)
        temporary = None
        try:
            temporary = self._temporary_in(folder)
            with open(temporary, "wb") as file:
                file.write(data)
                if self.fsync:
                    file.flush()
                    os.fsync(file.fileno())
            os.chmod(temporary, 0o644)
            os.rename(temporary, os.path.join(folder, entry.name))
        except OSError as error:
            if temporary:
                self._remove(temporary)
            self._warn_once(error, "result cache write failed (%s): serving uncached")
            return
        self.failures_logged.clear()
        self.written += _disk_bytes(len(data))
        self._maybe_prune()

    def _warn_once(self, error, message):
        """Log a failure once per cause (its errno) until the cache works again: a
        full or unwritable disk must not write a line per request."""
        if error.errno not in self.failures_logged:
            self.failures_logged.add(error.errno)
            log.warning(message, error)

    @staticmethod
    def _temporary_in(folder):
        """A new temporary file's path in folder, made if missing (trimming removes
        empty folders, perhaps just after makedirs: then once more)."""
        for attempt in (1, 2):
            try:
                os.makedirs(folder, exist_ok=True)
                descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-")
            except FileNotFoundError:
                if attempt == 2:
                    raise
                continue
            os.close(descriptor)
            return temporary

    def lock(self, key, kind=""):
        """A cross-process lock for one key, so one render makes it and others wait.
        Masters lock apart from answers (kind "m"): a render holding its answer's
        lock may wait for its master's, and the two must never be one lock file."""
        return _StripeLock(os.path.join(self.folder, ".locks", kind + key[:3]),
                           self.lock_timeout)

    def remove(self, entry):
        """Remove one entry (one that must not be served)."""
        return self._remove(os.path.join(self._folder_of(entry.key), entry.name))

    def _maybe_prune(self):
        due = (self.written > self.max_bytes * (1 - PRUNE_TO)
               or time.monotonic() - self.last_prune > 600)
        if due and self.pruning.acquire(blocking=False):
            self.written, self.last_prune = 0, time.monotonic()
            # eviction runs beside the requests, never inside one
            threading.Thread(target=self._prune_in_background, daemon=True).start()

    def _prune_in_background(self):
        try:
            self.prune()
        except OSError as error:
            self._warn_once(error, "cannot trim the result cache (%s): it may grow past "
                                   "cache_max_mb")
        except Exception:
            log.exception("result cache pruning failed")
        finally:
            self.pruning.release()

    def entries(self):
        """(path, entry or None, stat) of every file, temporary ones included."""
        for folder, _, names in os.walk(self.folder):
            if os.path.basename(folder) == ".locks":
                continue
            for name in names:
                if name == FIGURES_FILE:
                    continue
                path = os.path.join(folder, name)
                try:
                    yield path, CacheEntry.parse(name), os.stat(path)
                except OSError:
                    continue  # removed meanwhile

    def prune(self):
        """Trim to PRUNE_TO of the bound in disk blocks, least recently used first;
        drop stale temporaries and empty folders; note the figures for /_health.
        Removing a file being served is safe: the reader keeps its open descriptor.

        Returns the files removed, or None when another process is trimming; raises
        OSError when the trimming lock cannot be opened (a lock file another user
        made: the trim would never run)."""
        lock = _StripeLock(os.path.join(self.folder, ".locks", "prune"), 0)
        with lock as locked:
            if lock.error:
                raise lock.error
            if not locked:
                return None
            files, removed = [], 0
            for path, entry, stat in self.entries():
                if entry is None:
                    if time.time() - stat.st_mtime > 3600:
                        removed += self._remove(path)
                    continue
                files.append((stat.st_mtime, stat.st_blocks * 512, path))
            total = sum(size for _, size, _ in files)
            files.sort()
            while files and total > self.max_bytes * PRUNE_TO:
                _, size, path = files.pop(0)
                removed += self._remove(path)
                total -= size
            self._remove_empty_folders()
            self._write_figures({"entries": len(files), "bytes": total, "at": time.time()})
            return removed

    def _remove_empty_folders(self):
        """Fan-out folders left empty (deepest first; rmdir leaves any that are not)."""
        for folder, _, _ in os.walk(self.folder, topdown=False):
            if folder != self.folder and os.path.basename(folder) != ".locks":
                try:
                    os.rmdir(folder)
                except OSError:
                    pass  # not empty, or a render wrote into it meanwhile

    def _write_figures(self, figures):
        path = os.path.join(self.folder, FIGURES_FILE)
        try:
            temporary = self._temporary_in(self.folder)
            with open(temporary, "w", encoding="utf-8") as file:
                json.dump(figures, file)
            os.chmod(temporary, 0o644)
            os.rename(temporary, path)
        except OSError as error:
            log.warning("cannot write the cache figures (%s)", error)

    def figures(self):
        """Entries and bytes as of the last trim, and this process's counts, from
        one small file: constant time, however large the cache."""
        try:
            with open(os.path.join(self.folder, FIGURES_FILE), encoding="utf-8") as file:
                figures = json.load(file)
        except (OSError, ValueError):
            figures = {"entries": None, "bytes": None, "at": None}
        hits, misses = self.counts["hits"], self.counts["misses"]
        return {"entries_at_last_trim": figures.get("entries"),
                "bytes_at_last_trim": figures.get("bytes"),
                "last_trim": figures.get("at"), "max_bytes": self.max_bytes,
                "hits": hits, "misses": misses, "damaged": self.counts["damaged"],
                "hit_ratio": round(hits / (hits + misses), 3) if hits + misses else None}

    def purge(self, name):
        """Remove every variant of one source."""
        tag = source_tag(name)
        return sum(self._remove(path) for path, entry, _ in list(self.entries())
                   if entry and entry.source == tag)

    def stats(self):
        """Entries and bytes on disk, counted by walking the folder (for the command line)."""
        blocks = [stat.st_blocks * 512 for _, entry, stat in self.entries() if entry]
        return {"dir": self.folder, "entries": len(blocks), "bytes": sum(blocks),
                "max_bytes": self.max_bytes}

    @staticmethod
    def _remove(path):
        try:
            os.unlink(path)
            return 1
        except OSError:
            return 0


class _StripeLock:
    """flock on one of a bounded set of lock files; gives up after `timeout` seconds
    (then the caller goes on unlocked: a duplicate render beats a stuck request).

    The file is opened read-only (flock needs no more), so a lock file another user
    made, root running a command say, still locks for the server."""

    def __init__(self, path, timeout):
        self.path, self.timeout, self.descriptor, self.error = path, timeout, None, None

    def __enter__(self):
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self.descriptor = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            self.error = error
            return False
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.02)

    def __exit__(self, *exc_info):
        if self.descriptor is not None:
            os.close(self.descriptor)  # closing releases the lock


# --- responses ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Response:
    """Status, headers and a body: bytes, or an open file of `length` bytes.
    `key` and `hit` are for the request's log line; `source_bytes`, for the metrics,
    is what sending the source as it is would have cost (None where unknown)."""

    status: int
    headers: tuple
    body: object = b""
    length: Optional[int] = None
    key: str = "-"
    hit: bool = False
    source_bytes: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Produced:
    """An encoded image ready to send: its cache entry, its body (bytes, or the open
    cache file), the source whose bytes made it, and how it was had."""

    entry: CacheEntry
    body: object
    source: Source
    hit: bool
    timing: str

    def close(self):
        if hasattr(self.body, "close"):
            self.body.close()


#: Server-Timing of an answer from the result cache.
CACHE_HIT_TIMING = "cache;desc=hit"


def image_response(spec, produced, config):
    """200 with the image (bytes, or an open cache file that goes out through
    wsgi.file_wrapper) and every header caches and browsers need."""
    entry = produced.entry
    headers = _image_headers(spec, config, FORMATS[entry.format][1]) + _validators(
        entry.key, produced.source) + (
        ("Server-Timing", produced.timing),
        ("X-Image-Size", f"{entry.width}x{entry.height}"),
        ("X-Image-Quality", str(entry.quality)),
        ("X-Image-Network", spec.network),
    ) + ((("X-Image-Frames", frames_header(entry)),) if entry.animated else ())
    # a file's identity has its size; a remote source's size is unknown to a cache hit
    source_bytes = None if spec.url else produced.source.identity[1]
    return Response(200, headers, produced.body, entry.length, entry.key, produced.hit,
                    source_bytes)


def frames_header(entry):
    """X-Image-Frames of an animated source's answer: "all (N)" where every frame
    went out, else "first (REASON)" (STILL_REASONS)."""
    frames = entry.frames or "a"
    if frames.isascii() and frames.isdigit():
        return f"all ({int(frames)})"
    return f"first ({STILL_REASONS.get(frames, STILL_REASONS['a'])})"


def not_modified_response(spec, source, config, key):
    return Response(304, _image_headers(spec, config, None) + _validators(key, source), key=key)


def _validators(key, source):
    return (("X-Image-Key", key), ("ETag", f'"{key}"'), ("Last-Modified", http_date(source.mtime)))


def _image_headers(spec, config, content_type):
    # Shared caches (Apache's own in front, Varnish, a CDN) ask again after
    # s-maxage: a 304 while the source is unchanged, its new image once replaced.
    cache_control = (f"public, max-age={config.cache_max_age}, "
                     f"s-maxage={min(config.shared_max_age, config.cache_max_age)}, "
                     f"stale-while-revalidate={config.stale_while_revalidate}, "
                     f"stale-if-error={config.stale_if_error}")
    headers = (("Cache-Control", cache_control), ("Accept-CH", ", ".join(CLIENT_HINTS)))
    if content_type:
        headers = (("Content-Type", content_type),) + headers
    if spec and spec.vary:
        headers += (("Vary", ", ".join(spec.vary)),)
    return headers


def _error_headers(error, spec, config):
    """An error's caching headers: 4xx for error_max_age, 5xx never stored by a
    shared cache (a passing failure must not be replayed once it has passed)."""
    if error.status >= 500:
        headers = (("Cache-Control", "no-store"),)
    else:
        headers = (("Cache-Control", f"public, max-age={config.error_max_age}"),)
    if isinstance(error, MethodNotAllowed):
        headers += (("Allow", "GET, HEAD"),)
    if isinstance(error, Busy):
        headers += (("Retry-After", "2"),)
    if error.image and error.status != 404:
        headers += (("X-Image-Error", error.message),)
    if error.image and spec and spec.vary:
        headers += (("Vary", ", ".join(spec.vary)),)
    return headers


def pillow_build():
    """Which PIL is loaded: its version, whether it is Pillow-SIMD, how it was built."""
    from importlib import metadata
    simd = True
    try:
        metadata.distribution("Pillow-SIMD")
    except metadata.PackageNotFoundError:
        simd = False
    build = {}
    record = os.path.join(sys.prefix, "dynimg-build.json")
    if os.path.exists(record):
        with open(record, encoding="utf-8") as file:
            build = json.load(file)
    return {"version": Image.__version__, "simd": simd, "avx2": build.get("avx2"),
            "built_with": build.get("cc")}


def avif_build():
    """The AVIF plugin's libavif version and the encoder and speed used, or None."""
    if AVIF_ENCODER is None:
        return None
    codec, speed = AVIF_ENCODER
    return {"libavif": avif_codec.libavif_version, "encoder": codec, "speed": speed,
            "speed_small_answers": AVIF_SMALL_ANSWER_SPEEDS.get(codec, speed),
            "codecs": avif_codec.codec_versions()}


#: The classes the demo page shows, one tile each: the two a browser gets without
#: naming a class first, then the rest slowest first.
DEMO_CLASSES = ("default", "save-data", "slow-2g", "2g", "3g", "4g", "wifi")

#: Typical throughput of each class in kbit/s (the Network Information API's
#: ECT figures; 4g and wifi are ordinary figures), for the demo's arrival times
#: and its replay. Save-Data is asked for on slow links: shown at 2g's; the default
#: class (no hints: Firefox, Safari) at 4g's.
TYPICAL_KBITS = {"slow-2g": 50, "2g": 70, "3g": 700, "4g": 4000, "wifi": 20000,
                 "save-data": 70, "default": 4000}

#: The hints the demo page itself reads (it shows what this browser selected).
_DEMO_VARY = ("ECT", "Downlink", "Save-Data", "Sec-CH-DPR", "DPR", "Sec-CH-Viewport-Width",
              "Viewport-Width")

#: The demo's magnified crop: a square of this many CSS px showing the middle of
#: each image at twice the size it is shown at.
DEMO_ZOOM = 240

DEMO_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>dynimg: {name} on every network</title>
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; margin: 1.2em; color: #263238; }}
h1 {{ font-size: 1.4em; }}
#yours {{ background: #eceff1; padding: .6em 1em; margin-bottom: 1.5em; overflow: auto; }}
#yours img.own {{ float: right; width: 160px; height: auto; margin: 0 0 .5em 1em; }}
.tile {{ display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; margin: 0 0 2em;
  padding: .6em; border: 3px solid transparent; }}
.tile.selected {{ border-color: #ff6f00; background: #fff8e1; }}
.tile img.shown {{ width: {width}px; max-width: 100%; height: auto; display: block;
  background: #eceff1; }}
.zoom {{ position: relative; overflow: hidden; width: {zoom}px; height: {zoom}px;
  max-width: 100%; background: #eceff1; }}
.zoom img {{ position: absolute; left: 50%; top: 50%; width: {zoomed}px; max-width: none;
  transform: translate(-50%, -50%); }}
figcaption {{ flex: 1 1 16em; font-size: 14px; }}
figcaption a {{ font-size: 12px; overflow-wrap: anywhere; }}
.network {{ font-weight: bold; font-size: 1.1em; }}
.mark {{ color: #e65100; font-weight: bold; }}
button {{ font: inherit; padding: .3em .8em; }}
</style></head><body>
<h1>{name} at {width} CSS px, as each network class receives it</h1>
<section id="yours">
<img class="own" src="{own}" alt="what this browser gets">
<p>{explained}</p>
<p>So this browser gets the <span class="network">{network}</span> answer, marked
below. <button id="replay" type="button">See it arrive</button> replays every image at
its class's typical speed.</p>
<p>The picture here is what this browser was sent for the URL without
<code>bandwidth=</code>: {yours}</p>
<details><summary>The request headers this URL's answer varies on</summary>
<p>{vary}</p></details>
</section>
<main>
{figures}
</main>
<script>
// the replay: each image's bytes fed to the browser as fast as its class's link
// would bring them (kbit/s in data-kbits), so a progressive JPEG sharpens as it
// arrives and other formats appear when whole
async function replay(figure) {{
  const images = figure.querySelectorAll("img");
  const response = await fetch(images[0].currentSrc || images[0].src);
  const bytes = new Uint8Array(await response.arrayBuffer());
  const type = response.headers.get("Content-Type");
  const bytesPerMs = Number(figure.dataset.kbits) / 8;
  const clock = figure.querySelector(".clock");
  const started = performance.now();
  images.forEach(image => image.style.visibility = "hidden");
  let shown = null;
  const step = () => {{
    const elapsed = performance.now() - started;
    const got = Math.min(bytes.length, Math.floor(elapsed * bytesPerMs));
    const url = URL.createObjectURL(new Blob([bytes.subarray(0, got)], {{type}}));
    const probe = new Image();
    probe.onload = () => {{
      images.forEach(image => {{ image.src = url; image.style.visibility = "visible"; }});
      if (shown) URL.revokeObjectURL(shown);
      shown = url;
    }};
    probe.onerror = () => URL.revokeObjectURL(url);
    probe.src = url;
    clock.textContent = `${{(elapsed / 1000).toFixed(1)}} s: ${{got.toLocaleString()}} of ` +
      `${{bytes.length.toLocaleString()}} bytes`;
    if (got < bytes.length) setTimeout(step, 100);
  }};
  step();
}}
document.getElementById("replay").addEventListener("click", () =>
  document.querySelectorAll(".tile").forEach(replay));
// the width each image is drawn at, as laid out (the tests read it)
addEventListener("load", () => document.querySelectorAll("img.shown").forEach(image =>
  image.closest(".tile").dataset.shownWidth = image.getBoundingClientRect().width));
</script>
</body></html>
"""


# --- metrics ------------------------------------------------------------------

#: What /_metrics shows: name -> (Prometheus type, help text, label names). Each
#: figure is summed over the server's daemon processes; `class` is the network class.
METRICS = {
    "dynimg_requests_total": (
        "counter", "Requests answered, by HTTP status and network class (none: a page, "
        "or a request refused before its class was known).", ("status", "class")),
    "dynimg_sent_bytes_total": (
        "counter", "Body bytes sent, by network class and format (HEAD and 304 send none).",
        ("class", "format")),
    "dynimg_source_bytes_total": (
        "counter", "What sending the source files as they are would have cost, for the "
        "images sent (200 to a GET; remote sources not counted).", ("class",)),
    "dynimg_saved_bytes_total": (
        "counter", "Source bytes minus the bytes sent for the same images: what each class "
        "was spared (an answer larger than its source counts as saving none).", ("class",)),
    "dynimg_cache_hits_total": (
        "counter", "Images taken from the result cache (answers, error pictures, demo tiles).",
        ()),
    "dynimg_render_seconds": (
        "histogram", "Seconds each render took (open, decode, resize, encode); its count is "
        "the number of renders.", ()),
    "dynimg_process_exits_total": (
        "counter", "Daemon processes that have exited (maximum-requests, a crash, a graceful "
        "restart) since the server started, their counts kept.", ()),
    "dynimg_processes": (
        "gauge", "Daemon processes whose counts are in their own files now.", ()),
}

#: Upper bounds of the render-time histogram's buckets, in seconds (max_render_seconds
#: is 10 by default).
RENDER_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: Media type of the Prometheus text exposition format.
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: The `format` label of bytes sent, by Content-Type; anything else is "other".
SENT_FORMATS = {**{media: name for name, (_, media, _) in FORMATS.items()},
                "text/plain; charset=utf-8": "text", METRICS_TYPE: "text",
                "application/json": "json", "text/html; charset=utf-8": "html"}

#: Seconds a process's new counts may wait before its file is rewritten.
METRICS_FLUSH_SECONDS = 1.0

#: The most process files one sum reads: a server has one a live process, and those
#: of processes that exited until they are folded (at the next process start or scrape).
MAX_METRICS_FILES = 256

#: Seconds the file of an exited process stays after its counts went into the
#: retired total, so that a sum which read the old total still finds the file.
FOLD_GRACE_SECONDS = 60

#: Files of the run folder: SERVER.PROCESS.json and SERVER.retired.json, SERVER and
#: PROCESS being pid-starttime (a process's start in clock ticks since boot tells a
#: reused pid apart), PROCESS with a token (two apps in one process).
METRICS_FILE = re.compile(r"([0-9]+-[0-9]+)\.(retired|[0-9]+-[0-9]+-[0-9a-f]+)\.json")

#: Which counters make the per-class figures of the summary for a person.
CLASS_FIGURES = {"dynimg_requests_total": "requests", "dynimg_sent_bytes_total": "sent_bytes",
                 "dynimg_source_bytes_total": "source_bytes",
                 "dynimg_saved_bytes_total": "saved_bytes"}


def process_tag(pid):
    """'PID-STARTTIME' of a running process (from /proc), or None if it has exited
    (a zombie too) or there is no /proc to ask."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return None
    # the command name, in parentheses, may hold spaces: fields count from its end
    state, *fields = stat[stat.rindex(b")") + 2:].split()
    return None if state == b"Z" else f"{pid}-{int(fields[18])}"


def _is_running(tag):
    pid, started = tag.split("-")[:2]
    return process_tag(int(pid)) == f"{pid}-{started}"


class Metrics:
    """One process's counters, kept in memory, and its file in the run folder.

    The file is made at start. Then a request only adds to a dict under a lock of
    this process's, and a timer thread rewrites the file (a temporary file, then
    rename) at most once a METRICS_FLUSH_SECONDS, and once more at exit. The server
    is the process's parent, Apache's, which a graceful restart keeps (counting goes
    on) and a full restart replaces (counting starts afresh: a reset Prometheus sees)."""

    def __init__(self, folder):
        self.counts = collections.Counter()
        self.counting = threading.Lock()  # held for a dict update, never for I/O
        self.writing = threading.Lock()  # one write of this process's file at a time
        self.timer = None
        self.server = process_tag(os.getppid())
        self.name = f"{self.server}.{process_tag(os.getpid())}-{os.urandom(3).hex()}.json"
        # without /proc, a live process cannot be told from an exited one: no sharing
        self.folder = folder if self.server else ""
        self.folded = False
        self.failure_logged = False
        atexit.register(_flush_at_exit, weakref.ref(self))
        self.flush()  # listed from the start, so its exit is counted even if it served none

    def add(self, figures):
        """Add (name, labels, amount) figures; the file follows within a flush interval."""
        with self.counting:
            for name, labels, amount in figures:
                self.counts[name, labels] += amount
            if self.folder and self.timer is None:
                self.timer = threading.Timer(METRICS_FLUSH_SECONDS, self.flush)
                self.timer.daemon = True
                self.timer.start()

    def count_answer(self, response, network, media_type, sent):
        """One request, as its log line tells it: `sent` body bytes (0 for HEAD and
        304, which send none, and so save nothing against the source either)."""
        network = network or "none"
        figures = [("dynimg_requests_total", (str(response.status), network), 1)]
        if sent:
            figures.append(("dynimg_sent_bytes_total",
                            (network, SENT_FORMATS.get(media_type, "other")), sent))
        if sent and response.source_bytes is not None:
            figures += [("dynimg_source_bytes_total", (network,), response.source_bytes),
                        ("dynimg_saved_bytes_total", (network,),
                         max(0, response.source_bytes - sent))]
        self.add(figures)

    def count_render(self, seconds):
        bucket = next((repr(bound) for bound in RENDER_BUCKETS if seconds <= bound), "+Inf")
        self.add([("dynimg_render_seconds_bucket", (bucket,), 1),
                  ("dynimg_render_seconds_sum", (), seconds),
                  ("dynimg_render_seconds_count", (), 1)])

    def count_hit(self):
        self.add([("dynimg_cache_hits_total", (), 1)])

    def flush(self):
        """Write this process's counts to its file; the first time, fold the files of
        processes that exited before (so the folder does not grow with restarts)."""
        with self.writing:
            with self.counting:
                self.timer = None
                rows = [[name, list(labels), amount]
                        for (name, labels), amount in self.counts.items()]
            if not self.folder:
                return
            try:
                if not self.folded:
                    self.folded = True
                    fold_metrics(self.folder, self.server)
                _write_json(os.path.join(self.folder, self.name), {"counts": rows})
            except OSError as error:
                if not self.failure_logged:
                    self.failure_logged = True
                    log.warning("cannot write the metrics file in %s (%s): /_metrics "
                                "lacks this process", self.folder, error)

    def totals(self):
        """Every process's counts summed, this one's as of now."""
        self.flush()
        if not self.folder:
            with self.counting:
                counts = collections.Counter(self.counts)
            counts["dynimg_processes", ()] = 1
            return counts
        fold_metrics(self.folder, self.server)
        return sum_metrics(self.folder, self.server)


def _flush_at_exit(reference):
    metrics = reference()
    if metrics is not None and metrics.timer is not None:
        metrics.flush()


def _write_json(path, value):
    """Write atomically: a temporary file in the same folder, then rename."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            json.dump(value, file)
        os.chmod(temporary, 0o644)
        os.rename(temporary, path)
    except OSError:
        ResultCache._remove(temporary)
        raise


def _read_counts(path):
    """(counts, what else the file says) of a metrics file; empty if it is missing
    or not one of ours."""
    try:
        with open(path, encoding="utf-8") as file:
            value = json.load(file)
        return collections.Counter({(name, tuple(labels)): amount
                                    for name, labels, amount in value["counts"]}), value
    except (OSError, ValueError, TypeError, KeyError):
        return collections.Counter(), {}


def _metrics_files(folder):
    """(name, server, process) of the run folder's files, sorted by name."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    matches = map(METRICS_FILE.fullmatch, names)
    return [(match.group(0), *match.groups()) for match in matches if match]


def sum_metrics(folder, server):
    """One server's counts: its retired total plus the file of each process not yet
    folded into it (at most MAX_METRICS_FILES read). The total is read before the
    folder is listed: a file folded meanwhile stays FOLD_GRACE_SECONDS, so it is
    counted once, whichever the order."""
    counts, retired = _read_counts(os.path.join(folder, f"{server}.retired.json"))
    absorbed = retired.get("absorbed", {})
    names = [name for name, owner, process in _metrics_files(folder)
             if owner == server and process != "retired" and name not in absorbed]
    if len(names) > MAX_METRICS_FILES:
        log.warning("%d metrics files in %s: summing the first %d", len(names), folder,
                    MAX_METRICS_FILES)
    for name in names[:MAX_METRICS_FILES]:
        counts.update(_read_counts(os.path.join(folder, name))[0])
    counts["dynimg_processes", ()] = min(len(names), MAX_METRICS_FILES)
    return counts


def fold_metrics(folder, server):
    """Fold the files of this server's exited processes into its retired total, and
    remove files folded FOLD_GRACE_SECONDS ago and every file of a server that has
    stopped. Under a lock nobody waits for: if another process is folding, skip."""
    lock = _StripeLock(os.path.join(folder, ".fold.lock"), 0)
    with lock as locked:
        if not locked:
            return
        path = os.path.join(folder, f"{server}.retired.json")
        counts, retired = _read_counts(path)
        absorbed, now = dict(retired.get("absorbed", {})), time.time()
        for name, folded_at in list(absorbed.items()):
            if now - folded_at > FOLD_GRACE_SECONDS:
                ResultCache._remove(os.path.join(folder, name))  # first, then the total
                del absorbed[name]
        for name, owner, process in _metrics_files(folder):
            if owner != server and not _is_running(owner):
                ResultCache._remove(os.path.join(folder, name))
            elif (owner == server and process != "retired" and name not in absorbed
                  and not _is_running(process)):
                counts.update(_read_counts(os.path.join(folder, name))[0])
                counts["dynimg_process_exits_total", ()] += 1
                absorbed[name] = now
        if absorbed != retired.get("absorbed", {}):
            _write_json(path, {"counts": [[name, list(labels), amount] for (name, labels),
                                          amount in counts.items()], "absorbed": absorbed})


def metrics_servers(folder):
    """The running servers with files in the run folder (usually one)."""
    return sorted({owner for _, owner, _ in _metrics_files(folder) if _is_running(owner)})


def exposition(counts):
    """The counts as Prometheus text (the exposition format, version 0.0.4)."""
    lines = []
    for name, (kind, text, label_names) in METRICS.items():
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        lines += _histogram_lines(name, counts) if kind == "histogram" else [
            f"{name}{_label_text(label_names, labels)} {_number(amount)}"
            for labels, amount in _samples(name, label_names, counts)]
    return "\n".join(lines) + "\n"


def _samples(name, label_names, counts):
    samples = sorted((labels, amount) for (metric, labels), amount in counts.items()
                     if metric == name)
    return samples or ([] if label_names else [((), 0)])


def _histogram_lines(name, counts):
    lines, below = [], 0
    for bound in [repr(bound) for bound in RENDER_BUCKETS] + ["+Inf"]:
        below += counts[f"{name}_bucket", (bound,)]  # each bucket counts all below it too
        lines.append(f'{name}_bucket{{le="{bound}"}} {below}')
    return lines + [f"{name}_sum {_number(counts[f'{name}_sum', ()])}",
                    f"{name}_count {counts[f'{name}_count', ()]}"]


def _label_text(names, values):
    if not names:
        return ""
    escaped = (value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
               for value in values)
    return "{" + ",".join(f'{name}="{value}"' for name, value in zip(names, escaped)) + "}"


def _number(amount):
    return str(amount) if isinstance(amount, int) else repr(float(amount))


def summarize_metrics(counts):
    """The summed figures for a person (/_health, `dynimg.py stats`): requests by
    status, bytes by format, and requests and bytes by network class."""
    statuses, formats, classes = collections.Counter(), collections.Counter(), {}
    for (name, labels), amount in sorted(counts.items()):
        if name in CLASS_FIGURES:
            network = labels[METRICS[name][2].index("class")]
            figures = classes.setdefault(network, dict.fromkeys(CLASS_FIGURES.values(), 0))
            figures[CLASS_FIGURES[name]] += amount
        if name == "dynimg_requests_total":
            statuses[labels[0]] += amount
        elif name == "dynimg_sent_bytes_total":
            formats[labels[1]] += amount
    return {"processes": counts["dynimg_processes", ()],
            "process_exits": counts["dynimg_process_exits_total", ()],
            "requests": dict(statuses), "renders": counts["dynimg_render_seconds_count", ()],
            "render_seconds": round(counts["dynimg_render_seconds_sum", ()], 3),
            "cache_hits": counts["dynimg_cache_hits_total", ()],
            "sent_bytes_by_format": dict(formats), "classes": classes}


# --- WSGI application -----------------------------------------------------------


class App:
    """The dynimg WSGI application. It owns what lives as long as the process:
    the config, the result cache, the render slots, the colour transforms and the
    facts of sources seen; two apps (two configs) can live in one process.

    Every image it sends, whatever it is for (an answer, a 404 or error picture,
    a demo tile), comes through produce(): from the result cache, or rendered in
    a render slot and kept.
    """

    def __init__(self, config):
        limit_pillow()
        self.config = config
        self.cache = ResultCache(config) if config.cache_dir else None
        self.slots = RenderSlots(config.max_concurrent_renders, config.queue_timeout,
                                 config.max_waiting_renders)
        self.transforms = LRU(TRANSFORM_CACHE_SIZE)
        self.facts = LRU(FACTS_CACHE_SIZE)
        self.metrics = Metrics(config.metrics_dir)
        self.pages = {"/_health": self.health_page, "/_demo": self.demo_page,
                      "/_html": self.html_page, "/_metrics": self.metrics_page}

    def __call__(self, environ, start_response):
        """Build the request, answer it, start the response, log one line."""
        started = time.perf_counter()
        request = Request.from_environ(environ)
        try:
            response, spec = self.respond(request)
        except MemoryError:
            raise
        except Exception:
            log.exception("unexpected error for %s?%s", request.path, request.query)
            response, spec = self.error_response(InternalError("internal error"), None), None
        length = response.length if response.length is not None else len(response.body)
        headers = list(response.headers)
        if response.status != 304:
            # a 304's Content-Length would describe the image, not this empty answer; a
            # wrong one makes caches (Apache's mod_cache) throw their stored copy away
            headers.append(("Content-Length", str(length)))
        start_response(f"{response.status} {http.HTTPStatus(response.status).phrase}", headers)
        content_type = dict(headers).get("Content-Type", "-")
        log.info("%s %s?%s %d %d bytes net=%s type=%s cache=%s key=%s %.0f ms",
                 request.method, request.path, request.query, response.status, length,
                 spec.network if spec else "-", content_type,
                 "hit" if response.hit else "-", response.key,
                 (time.perf_counter() - started) * 1000)
        sends_body = request.method != "HEAD" and response.status != 304
        self.metrics.count_answer(response, spec and spec.network, content_type,
                                  length if sends_body else 0)
        if not sends_body:
            if hasattr(response.body, "close"):
                response.body.close()
            return []
        if hasattr(response.body, "read"):
            file_wrapper = environ.get("wsgi.file_wrapper")
            return file_wrapper(response.body, 65536) if file_wrapper else _chunks(response.body)
        return [response.body]

    def respond(self, request):
        """(response, spec or None): the one place an HTTPError becomes a response."""
        spec = None
        try:
            if request.method not in ("GET", "HEAD"):
                raise MethodNotAllowed("method not allowed")
            if request.path.startswith("/_"):
                page = self.pages.get(request.path)
                if page is None:
                    raise NotFound("no such page")
                return page(request), None
            spec = parse_spec(request, self.config)
            return self.serve_image(spec, request), spec
        except HTTPError as error:
            if error.status >= 500 or error.detail != error.message:
                log.info("%s: %s", error.status, error.detail)
            return self.error_response(error, spec), spec

    def serve_image(self, spec, request):
        """304 if the client has it, else the image (cached or rendered)."""
        source = stat_source(spec, self.config)
        key = self.known_key(spec, source)
        if key and _client_has_it(request, key, source):
            return not_modified_response(spec, source, self.config, key)
        produced = self.produce(spec, source, key, lambda: open_source(spec, self.config))
        return image_response(spec, produced, self.config)

    def known_key(self, spec, source):
        """The image key of spec's answer from this source, where the source's facts
        are known without reading it all (a file's header; a remote source once it
        has been fetched); else None."""
        probe = None if spec.url else (lambda: self._probe(source))
        facts = self.facts.get(source.identity, probe)
        if isinstance(facts, Unprocessable):
            raise facts
        return facts and image_key(spec, plan_output(facts, spec, self.config), source.identity)

    def _probe(self, source):
        """A file's Facts, or the Unprocessable it raised: remembered either way, so a
        file that is not a usable image has its header parsed once, not per request."""
        try:
            return probe_file(source.path, self.config)
        except Unprocessable as error:
            return error

    def produce(self, spec, source, key, read):
        """The encoded image for spec: from the result cache, else rendered in a render
        slot (one render per key across processes while the cache is on).

        `read` gives the source with its bytes when a render needs them. Requests
        for a key being rendered wait for that one render (the key's lock) rather than
        for a slot: they then get it from the cache, so a crowd asking for one new
        image costs one render and no 503s."""
        if key is None or self.cache is None:
            return self._render(spec, read)
        produced = self._cached(key, source)
        if produced is None:
            with self.cache.lock(key):
                # another process may have made it while we waited
                produced = self._cached(key, source) or self._render(spec, read, source)
        return produced

    def _cached(self, key, source):
        hit = self.cache.lookup(key)
        if hit is None:
            return None
        self.cache.counts["hits"] += 1
        self.metrics.count_hit()
        entry, file = hit
        return Produced(entry, file, source, True, CACHE_HIT_TIMING)

    def _render(self, spec, read, stated=None):
        """Render in a render slot, keyed by the identity of the bytes actually read,
        and keep the result. From the source's master where one is kept that has
        pixels enough (then the source is not read at all); else from the source. A
        remote source is fetched before the slot is taken (it waits on its origin, not
        on a core); a file is read in the slot, so renders waiting for one hold no
        source bytes."""
        master = stated and self._kept_master(spec, stated)
        fetched = read() if spec.url and not master else None
        with self.slots:
            if master:
                source = stated
                rendered = self._from_master(*master, spec, ("master", 0.0, "kept"))
            else:
                source = fetched or read()
                rendered = self._render_source(source, spec)
        self.metrics.count_render(sum(seconds for _, seconds, *_ in rendered.timings))
        self.facts.put(source.identity, rendered.facts)
        key = image_key(spec, rendered.plan, source.identity)
        entry = CacheEntry.of(key, source_tag(spec.url or source.identity[0]), rendered)
        if self.cache is not None:
            self.cache.counts["misses"] += 1
            self.cache.store(entry, rendered.data)
        return Produced(entry, rendered.data, source, False, _server_timing(rendered.timings))

    def _render_source(self, source, spec):
        """Render from the source's bytes; where the source is worth a master and
        the answer can come from one, make the master first (once across processes:
        the master's lock) and render from it."""
        image = open_image(source.data, self.config)
        facts = facts_of(image, source.data)
        if (self.cache is None or not master_pays(image, facts)
                or not master_serves(plan_output(facts, spec, self.config), master_size(facts))):
            return render_opened(image, facts, source.data, spec, self.config, self.transforms)
        key = master_key(source.identity)
        with self.cache.lock(key, "m"):
            kept = self._kept_master(spec, source)
            if kept:  # another process made it while we waited
                return self._from_master(*kept, spec, ("master", 0.0, "kept"))
            started = time.perf_counter()
            try:
                data = make_master(image, facts, source.data, self.config, self.transforms)
            except Unprocessable as error:
                # decoded at 2048 px, a source may take more than max_render_mb where
                # this answer, decoded at its own scale, would not: answer without
                log.info("no master of %s: %s", spec.url or source.path, error.message)
                image = open_image(source.data, self.config)
                return render_opened(image, facts, source.data, spec, self.config,
                                     self.transforms)
            self.cache.store(CacheEntry(key, source_tag(spec.url or source.identity[0]),
                                        *master_size(facts), MASTER_QUALITY, False,
                                        len(data), zlib.crc32(data), "jpeg"), data)
            made = ("master", time.perf_counter() - started, "made")
        log.info("made a master of %s, %dx%d, %d bytes, in %.0f ms", spec.url or source.path,
                 *master_size(facts), len(data), made[1] * 1000)
        return self._from_master(*open_master(data, self.config), data, spec, made)

    def _kept_master(self, spec, stated):
        """(image, Facts, bytes) of the master kept for this source, where there is
        one with pixels enough for spec's answer; else None. A master that does not
        open as one is removed (it cannot be trusted for any answer)."""
        known = self.facts.get(stated.identity)
        if self.cache is None or (isinstance(known, Facts) and (
                known.size[0] * known.size[1] < MASTER_MIN_PIXELS
                or not master_serves(plan_output(known, spec, self.config),
                                     master_size(known)))):
            return None  # known without reading a master: none, or too small for this
        hit = self.cache.lookup(master_key(stated.identity))
        if hit is None:
            return None
        entry, file = hit
        with file:
            data = file.read()
        try:
            image, facts = open_master(data, self.config)
        except Unprocessable:
            log.warning("removing a cache file that is no master: %s", entry.name)
            self.cache.remove(entry)
            return None
        if not master_serves(plan_output(facts, spec, self.config), image.size):
            return None
        return image, facts, data

    def _from_master(self, image, facts, data, spec, timing):
        # whole: decoded at 1/2 or 1/4 its 8x8 blocks show in flat skies (up to 2.6
        # SSIMULACRA2 below the source's answer); whole, its answers score at or
        # above the source's (bench/masters.py)
        rendered = render_opened(image, facts, data, spec, self.config, self.transforms,
                                 draft=False)
        return dataclasses.replace(rendered, timings=rendered.timings + (timing,))

    def error_response(self, error, spec):
        """An HTTPError as a response: a line of text, or its picture fitted to the
        request (made and cached like any image); 503 if no render slot comes free."""
        headers = _error_headers(error, spec, self.config)
        if error.image is None:
            text = b"" if isinstance(error, MethodNotAllowed) else (error.message + "\n").encode()
            return Response(error.status,
                            headers + (("Content-Type", "text/plain; charset=utf-8"),), text)
        try:
            body, length, content_type = self.error_picture(error.image, spec)
        except Busy as busy:
            return self.error_response(busy, None)
        return Response(error.status, headers + (("Content-Type", content_type),), body, length)

    def error_picture(self, name, spec):
        """(body, length, media type) of the picture for an error (`name`: a config
        attribute), fitted to the request; for a request that never became a spec,
        or where fitting fails, the picture file as it is."""
        path = getattr(self.config, name)
        if spec is not None:
            try:
                return self._fitted_picture(name, path, spec)
            except (Busy, MemoryError):
                raise
            except Unprocessable as error:  # fitted, it would take more than the limits
                log.info("error picture %s not fitted: %s", path, error.message)
            except Exception:  # the picture is broken, or a bug: the answer still goes out
                log.exception("cannot fit the error picture %s", path)
        try:
            with open(path, "rb") as file:
                data = file.read()
        except OSError as error:
            log.error("cannot read the error picture %s: %s", path, error)
            data = b""
        return data, len(data), mimetypes.guess_type(path)[0] or "application/octet-stream"

    def _fitted_picture(self, name, path, spec):
        source = file_source(path, "picture:" + name, os.stat(path))
        spec = dataclasses.replace(spec, name=name, url="", upscale=True, max_bytes=0)
        produced = self.produce(spec, source, self.known_key(spec, source),
                                lambda: read_file_source(path, "picture:" + name, self.config))
        return produced.body, produced.entry.length, FORMATS[produced.entry.format][1]

    def health_page(self, request):
        """JSON: status and version for anyone; the build, paths, cache figures and the
        summed metrics only where [server] health_details allows. Nothing is walked:
        one small file is read per daemon process."""
        body = {"status": "ok", "version": VERSION, "avif": AVIF_ENCODER is not None}
        if self.config.health_details:
            body.update(pillow=pillow_build(), formats=self.config.input_formats,
                        output_formats=AVAILABLE_FORMATS, auto_formats=self.config.auto_formats,
                        avif_encoder=avif_build(),
                        config=self.config.path, image_root=self.config.image_root,
                        cache=self.cache.figures() if self.cache else None,
                        metrics=summarize_metrics(self.metrics.totals()))
        return Response(200, (("Content-Type", "application/json"),
                              ("Cache-Control", "no-store")),
                        json.dumps(body, indent=2).encode() + b"\n")

    def metrics_page(self, request):
        """Prometheus text: the counts of every process of this server, summed; only
        for [metrics] allowed_networks."""
        if not may_read_metrics(request, self.config):
            raise Forbidden("/_metrics is only for [metrics] allowed_networks")
        return Response(200, (("Content-Type", METRICS_TYPE), ("Cache-Control", "no-store")),
                        exposition(self.metrics.totals()).encode())

    def html_page(self, request):
        """The <img> markup for a name, as text (what `dynimg.py html` prints)."""
        if self.config.signing_keys:
            raise Forbidden("/_html is off while URLs must be signed: dynimg.py html signs")
        params = _parse_query(request.query, MARKUP_PARAMETERS, aliases={})
        if "name" not in params:
            raise BadRequest("name: required, such as /_html?name=sunset.jpg")
        try:
            text = self.markup(check_name(params["name"]), params.get("sizes", DEFAULT_SIZES),
                               params.get("alt", ""), request.script_name or "/images")
        except HTTPError as error:
            error.image = None  # a tool reading text gets the reason as text, not a picture
            raise
        return Response(200, (("Content-Type", "text/plain; charset=utf-8"),
                              ("Cache-Control", "no-store")), text.encode())

    def markup(self, name, sizes, alt, base, sign_with=None):
        """A ready <img> for a source: srcset over the width ladder up to the source's
        own width, sizes, width/height at its aspect, lazy loading, and its placeholder
        inlined as a blurred background; the headers a page needs as a comment."""
        query = "placeholder=1&format=webp"
        if self.config.signing_keys:  # the server's own request, made with its own key
            query += "&sig=" + sign("/" + name, query, self.config.signing_keys[0])
        spec = parse_spec(Request(path="/" + name, query=query), self.config)
        source = stat_source(spec, self.config)
        produced = self.produce(spec, source, self.known_key(spec, source),
                                lambda: open_source(spec, self.config))
        with contextlib.closing(produced):
            body = produced.body.read() if hasattr(produced.body, "read") else produced.body
        placeholder = produced.entry
        # known by now (the placeholder's key needed them); probed again if evicted
        facts = self.facts.get(source.identity, lambda: self._probe(source))
        if isinstance(facts, Unprocessable):
            raise facts
        width, height = facts.size
        largest = min(width, self.config.max_width)
        ladder = [step for step in self.config.width_steps if step < largest] + [largest]
        shown = min(largest, _last_length(sizes) or 640)

        def url(query):
            query += "&dpr=1&format=auto"
            if sign_with:
                query += "&sig=" + sign("/" + name, query, sign_with)
            return f"{base}/{urllib.parse.quote(name)}?{query}"

        inline = base64.b64encode(body).decode()
        return MARKUP.format(
            name=name, width=width, height=height, origin=_origin(base),
            hints=", ".join(CLIENT_HINTS),
            policy=", ".join(f'ch-{hint.lower().removeprefix("sec-ch-")}=("{_origin(base)}")'
                             for hint in CLIENT_HINTS),
            delegate="; ".join(f"{hint.lower()} {_origin(base)}" for hint in CLIENT_HINTS),
            src=html.escape(url(f"width={shown}")),
            srcset=",\n       ".join(html.escape(url(f"width={step}")) + f" {step}w"
                                     for step in ladder),
            sizes=html.escape(sizes), alt=html.escape(alt), shown_width=shown,
            shown_height=max(1, round(shown * height / width)),
            background=_blurred_background(inline, placeholder.width, placeholder.height))

    def demo_page(self, request):
        """An HTML page showing one image as each network class would receive it, at
        the CSS width asked, with a magnified crop and a replay of its arrival."""
        if not self.config.demo:
            raise NotFound("no such page")
        if self.config.signing_keys:
            # the demo renders any name and size: with signed URLs, it would bypass them
            raise Forbidden("the demo page is off while URLs must be signed")
        params = _parse_query(request.query)
        width = _int_param(params, "width", 1, self.config.max_width, 640)
        if "name" not in params:
            raise BadRequest("name: required, such as /_demo?name=sunset.jpg")
        name = check_name(params["name"])
        # the tiles ask for this format (format=auto: what this browser takes)
        image_format = params.get("format")
        if image_format is not None:
            _choice_param(params, "format", {**FORMATS, "auto": None}, None)
        query = f"width={width}&format={image_format}" if image_format else f"width={width}"
        yours = self._demo_variant(request, name, query)
        figures = [self._demo_figure(request, name, network, query,
                                     yours[0].network)
                   for network in DEMO_CLASSES if network in self.config.profiles]
        body = DEMO_PAGE.format(
            name=html.escape(name), width=width, zoom=min(DEMO_ZOOM, width),
            zoomed=2 * width, network=html.escape(yours[0].network),
            explained=_explain_hints(request, yours[0]),
            own=_demo_url(request, name, query),
            yours=_demo_caption(*yours, request, name, query),
            vary=html.escape(", ".join(yours[0].vary) or "none"),
            figures="\n".join(figures)).encode()
        return Response(200, (("Content-Type", "text/html; charset=utf-8"),
                              ("Accept-CH", ", ".join(CLIENT_HINTS)),
                              ("Critical-CH", "ECT, Save-Data, Sec-CH-DPR"),
                              ("Vary", ", ".join(_DEMO_VARY)),
                              ("Cache-Control", "no-store")), body)

    def _demo_variant(self, request, name, query):
        """(spec, cache entry) of the image a URL gives this browser: from the result
        cache, or rendered and kept like any request's."""
        spec = parse_spec(dataclasses.replace(request, path="/" + name, query=query),
                          self.config)
        source = stat_source(spec, self.config)
        produced = self.produce(spec, source, self.known_key(spec, source),
                                lambda: open_source(spec, self.config))
        produced.close()
        return spec, produced.entry

    def _demo_figure(self, request, name, network, query, selected):
        """One tile: the class's image at the asked CSS width, its middle magnified,
        and what was sent."""
        query = f"bandwidth={network}&{query}"
        spec, entry = self._demo_variant(request, name, query)
        url = _demo_url(request, name, query)
        chosen = " selected" if network == selected else ""
        return (f'<figure class="tile{chosen}" id="{network}" '
                f'data-kbits="{TYPICAL_KBITS.get(network, 4000)}">'
                f'<img class="shown" src="{url}" alt="{network}">'
                f'<div class="zoom"><img src="{url}" alt="{network}, magnified"></div>'
                f'<figcaption>{_demo_caption(spec, entry, request, name, query)}'
                f'{"<br><span class=mark>this browser&#39;s class</span>" if chosen else ""}'
                f'<br><span class="clock"></span></figcaption></figure>')


#: What `sizes` says when the caller gives none: as wide as the viewport, up to
#: 640 CSS px.
DEFAULT_SIZES = "(max-width: 640px) 100vw, 640px"

#: /_html's parameters: the longest text each may have, and whether it may be
#: empty (alt="" is right for a decorative image).
MARKUP_PARAMETERS = {"name": (MAX_NAME_BYTES, False), "sizes": (1000, False),
                     "alt": (1000, True)}

MARKUP = """<!-- dynimg: {name}, {width}x{height}.
  Chromium sends the client hints that choose the network class and density only
  to origins that ask. The page's own response asks with the header
    Accept-CH: {hints}
  or, in its <head>,
    <meta http-equiv="Accept-CH" content="{hints}">
  Images on another origin than the page's also need the hints delegated to it:
    Permissions-Policy: {policy}
  or <meta http-equiv="Delegate-CH" content="{delegate}">
  Firefox and Safari send no hints: srcset still gives them the width, and the
  default class. -->
<img src="{src}"
  srcset="{srcset}"
  sizes="{sizes}"
  width="{shown_width}" height="{shown_height}" alt="{alt}" loading="lazy" decoding="async"
  style="max-width: 100%; height: auto; background: {background}">
"""


def _server_timing(timings):
    """A Server-Timing value: (name, seconds) or (name, seconds, description) each."""
    return ", ".join(f"{name};" + (f"desc={more[0]};" if more else "") + f"dur={seconds * 1000:.1f}"
                     for name, seconds, *more in timings)


def _last_length(sizes):
    """The CSS px of a sizes attribute's last (default) entry, if it is in px."""
    match = re.search(r"(\d+)px\s*$", sizes)
    return int(match.group(1)) if match else None


def _origin(base):
    """scheme://host of an absolute base URL, else a stand-in for the image host."""
    parts = urllib.parse.urlsplit(base)
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else "https://IMAGE-HOST"


def _blurred_background(inline_webp, width, height):
    """A CSS background: the placeholder in an SVG that blurs it (a Gaussian blur,
    its edges kept opaque), stretched over the image's box."""
    svg = (f"<svg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 {width} {height}' "
           f"preserveAspectRatio='none'><filter id='b' color-interpolation-filters='sRGB'>"
           f"<feGaussianBlur stdDeviation='1'/><feComponentTransfer><feFuncA type='table' "
           f"tableValues='1 1'/></feComponentTransfer></filter><image width='{width}' "
           f"height='{height}' preserveAspectRatio='none' filter='url(%23b)' "
           f"href='data:image/webp;base64,{inline_webp}'/></svg>")
    return f"center / 100% 100% no-repeat url(&quot;data:image/svg+xml,{svg}&quot;)"


def _demo_url(request, name, query):
    """An image URL on the demo page, escaped for HTML."""
    return html.escape(f"{request.script_name}/{urllib.parse.quote(name)}?{query}")


def _demo_caption(spec, entry, request, name, query):
    """What was sent for one demo URL, in a line or two, and the URL itself."""
    kbits = TYPICAL_KBITS.get(spec.network, 4000)
    seconds = entry.length * 8 / 1000 / kbits
    url = _demo_url(request, name, query)
    # the link may break at its parameters, never inside a number
    shown = url.replace("&amp;", "<wbr>&amp;")
    return (f'<span class="network">{html.escape(spec.network)}</span>: '
            f'<span class="bytes">{entry.length:,}</span> bytes, '
            f'{entry.width}×{entry.height} px {entry.format.upper()}, quality {entry.quality}; '
            f'arrives in ~{seconds:.1f} s at {kbits:,} kbit/s'
            f'<br><a href="{url}">{shown}</a>')


def _explain_hints(request, spec):
    """This browser's client hints in plain words: what it said, and what dynimg made
    of it."""
    said = []
    if request.header("Save-Data")[1] in ("on", "?1"):
        said.append("it asks to save data")
    ect = request.header("ECT")[1]
    if ect:
        said.append(f"its connection is like {html.escape(_printable(ect)[:16])}")
    downlink = request.header("Downlink")[1]
    if downlink and not ect:
        said.append(f"its downlink is {html.escape(_printable(downlink)[:16])} Mbit/s")
    dpr = request.header("Sec-CH-DPR", "DPR")[1]
    if dpr:
        said.append(f"its screen has {html.escape(_printable(dpr)[:16])} device pixels "
                    "per CSS pixel")
    viewport = request.header("Sec-CH-Viewport-Width", "Viewport-Width")[1]
    if viewport:
        said.append(f"its window is {html.escape(_printable(viewport)[:16])} CSS px wide")
    if not said:
        return ("This browser sent no client hints (Firefox and Safari never do; Chromium "
                "sends them once a page asks, as this one does). Without them, and without "
                "<code>bandwidth=</code> in the URL, an image gets the default class.")
    return ("This browser's client hints say " + "; ".join(said)
            + f". dynimg made that class {html.escape(spec.network)}, density "
              f"{spec.dpr:g}.")


def create_app(path=None):
    """The app for a config file (DYNIMG_CONFIG, else the dynimg.ini beside this
    module), with logging set up from it: what dynimg.wsgi and the command line run.
    A bad value raises ConfigError naming the section and key."""
    return app_for(load_config(path))


def app_for(config):
    """The app for a loaded config, with logging set up from it."""
    configure_logging(config)
    tune_malloc()
    return App(config)


def _client_has_it(request, key, source):
    """If-None-Match decides when sent; otherwise If-Modified-Since."""
    if_none_match = request.headers.get("If-None-Match")
    if if_none_match is not None:
        return is_not_modified(if_none_match, f'"{key}"')
    if_modified_since = request.headers.get("If-Modified-Since")
    return if_modified_since is not None and not is_modified_since(if_modified_since,
                                                                   source.mtime)


def _chunks(file):
    with file:
        yield from iter(lambda: file.read(65536), b"")


# --- command line -------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(prog="dynimg", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="path of dynimg.ini (default: DYNIMG_CONFIG or beside "
                        "dynimg.py)")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve with wsgiref, for a local try")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    commands.add_parser("check", help="check the config and exit")
    sign_command = commands.add_parser("sign", help="print a signed URL")
    sign_command.add_argument("url", help='the URL, or its path and query, such as '
                              '"/images/sunset.jpg?width=300"')
    sign_command.add_argument("--mount", default="/images", help="where the app is mounted")
    cache = commands.add_parser("cache", help="the result cache: stats, purge NAME, prune")
    cache.add_argument("action", choices=("stats", "purge", "prune"))
    cache.add_argument("name", nargs="?", help="with purge: the source whose variants go "
                       "(a name under image_root, or a url= source's URL)")
    html_command = commands.add_parser("html", help="print an <img> for a source: srcset, "
                                       "sizes, width/height, an inline placeholder")
    html_command.add_argument("name", help="the source's name under image_root")
    html_command.add_argument("--sizes", default=DEFAULT_SIZES, help="the sizes attribute "
                              f'(default "{DEFAULT_SIZES}")')
    html_command.add_argument("--alt", default="", help="the alt text")
    html_command.add_argument("--base", default="/images", help="the URL the app is mounted "
                              "at, such as https://img.example.com/images")
    stats_command = commands.add_parser("stats", help="what the running server has served: "
                                        "requests, renders, bytes sent and saved by class")
    stats_command.add_argument("--json", action="store_true", help="as /_health shows it")
    render_command = commands.add_parser("render", help="run the pipeline on one image offline")
    render_command.add_argument("name", help="a file, or a name under image_root")
    render_command.add_argument("-o", "--output", required=True)
    for option in ("width", "height", "fit", "gravity", "quality", "format", "bandwidth",
                   "screensize", "dpr", "bg"):
        render_command.add_argument("--" + option)
    render_command.add_argument("--forcefit", action="store_true")
    render_command.add_argument("--upscale", action="store_true")
    render_command.add_argument("--placeholder", action="store_true")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as error:
        print(f"dynimg: {error}", file=sys.stderr)
        return 2
    if args.command != "serve":
        # a one-off command is no server: it neither counts nor writes in the run folder
        args.run_dir, config = config.metrics_dir, dataclasses.replace(config, metrics_dir="")
    if args.command in CACHE_WRITERS:
        refusal = _become_cache_owner(config, args.command)
        if refusal:
            print(f"dynimg: {refusal}", file=sys.stderr)
            return 2
    return COMMANDS[args.command](args, app_for(config))


#: Commands that write into the result cache, which must stay the server's.
CACHE_WRITERS = ("serve", "cache", "html")


def _become_cache_owner(config, command):
    """Run as root, act as the owner of cache_dir (the server's user), so that no
    file or folder made here is one the server cannot use; a reason to refuse when
    that cannot be known (no cache_dir yet: it would be root's)."""
    if os.geteuid() != 0 or not config.cache_dir:
        return None
    try:
        owner = os.stat(config.cache_dir)
    except FileNotFoundError:
        return (f"as root, {command} would make {config.cache_dir} root's, and the server "
                f"could not use it; run it as the server's user: runuser -u www-data -- "
                f"{sys.executable} {' '.join(sys.argv)}")
    if owner.st_uid == 0:
        return None  # root's cache already: nothing here is the server's to spoil
    os.setgroups([])
    os.setgid(owner.st_gid)
    os.setuid(owner.st_uid)
    return None


def _command_check(args, app):
    print(f"{app.config.path}: ok (image root {app.config.image_root})")
    return 0


def _command_sign(args, app):
    config = app.config
    if not config.signing_keys:
        print("dynimg: no signing_key is set in [security]", file=sys.stderr)
        return 1
    parts = urllib.parse.urlsplit(args.url)
    path = urllib.parse.unquote(parts.path)
    mount = args.mount.rstrip("/")
    if path != mount and not path.startswith(mount + "/"):
        print(f"dynimg: sign needs the URL, or its path and query, as a browser asks for "
              f"it: {mount}/sunset.jpg?width=300 (the path starts with the mount, {mount}; "
              "--mount names another)", file=sys.stderr)
        return 2
    if "sig" in urllib.parse.parse_qs(parts.query):
        print("dynimg: the URL is signed already (it has sig=)", file=sys.stderr)
        return 2
    signature = sign(path[len(mount):] or "/", parts.query, config.signing_keys[0])
    print(f"{args.url}{'&' if parts.query else '?'}sig={signature}")
    return 0


def _command_cache(args, app):
    cache = app.cache
    if cache is None:
        print("dynimg: the result cache is off (cache_dir is empty)", file=sys.stderr)
        return 1
    if args.action == "purge":
        if not args.name:
            print("dynimg: cache purge needs the source's name", file=sys.stderr)
            return 2
        # a remote source goes by its URL, as url= gave it; a file by its name
        remote = args.name.startswith(("http://", "https://"))
        source = args.name if remote else check_name(args.name)
        print(f"removed {cache.purge(source)} cached variants of {args.name}")
    elif args.action == "prune":
        try:
            removed = cache.prune()
        except OSError as error:
            print(f"dynimg: cannot trim the result cache: {error}", file=sys.stderr)
            return 1
        if removed is None:
            print("dynimg: another process is trimming the result cache now", file=sys.stderr)
            return 1
        print(f"removed {removed} files; bound {cache.max_bytes // 1048576} MiB")
    stats = cache.stats()
    print(f"{stats['dir']}: {stats['entries']} entries, {stats['bytes'] / 1048576:.1f} MiB "
          f"of {stats['max_bytes'] // 1048576} MiB")
    return 0


def _command_html(args, app):
    keys = app.config.signing_keys
    try:
        print(app.markup(check_name(args.name), args.sizes, args.alt, args.base.rstrip("/"),
                         sign_with=keys[0] if keys else None), end="")
    except HTTPError as error:
        print(f"dynimg: {error.status}: {error.message} ({args.name} under "
              f"{app.config.image_root})", file=sys.stderr)
        return 1
    return 0


def _command_serve(args, app):
    from wsgiref.simple_server import make_server, WSGIRequestHandler

    def mounted(environ, start_response):
        # mimic WSGIScriptAlias /images: the app sees the rest of the path
        path = environ.get("PATH_INFO", "")
        if path != "/images" and not path.startswith("/images/"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"dynimg is mounted at /images/\n"]
        environ["SCRIPT_NAME"], environ["PATH_INFO"] = "/images", path[len("/images"):]
        return app(environ, start_response)

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *args):
            pass  # the app logs each request itself

    with make_server(args.host, args.port, mounted, handler_class=QuietHandler) as server:
        print(f"dynimg serving {app.config.image_root} at http://{args.host}:{args.port}/images/")
        server.serve_forever()
    return 0


def _command_stats(args, app):
    """The summed counts of the servers writing to the run folder (it reads, never
    writes: run as root, it leaves nothing the server could not replace)."""
    folder = args.run_dir
    counts = collections.Counter()
    servers = metrics_servers(folder) if folder else []
    for server in servers:
        counts.update(sum_metrics(folder, server))
    summary = summarize_metrics(counts)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    if not servers:
        print(f"dynimg: no running server counts in {folder or '([metrics] run_dir is empty)'}",
              file=sys.stderr)
        return 1
    print(f"{folder}: {summary['processes']} processes, {summary['process_exits']} exited")
    print("requests: " + ", ".join(f"{status}: {count:,}"
                                   for status, count in sorted(summary["requests"].items())))
    print(f"renders: {summary['renders']:,} ({summary['render_seconds']:,.1f} s), "
          f"result-cache hits: {summary['cache_hits']:,}")
    print(f"{'class':<10} {'requests':>9} {'bytes sent':>14} {'source bytes':>14} "
          f"{'saved':>14}")
    for network, figures in sorted(summary["classes"].items()):
        share = (f" ({figures['saved_bytes'] / figures['source_bytes']:.0%})"
                 if figures["source_bytes"] else "")
        print(f"{network:<10} {figures['requests']:>9,} {figures['sent_bytes']:>14,} "
              f"{figures['source_bytes']:>14,} {figures['saved_bytes']:>14,}{share}")
    return 0


def _command_render(args, app):
    params = {name: value for name, value in vars(args).items()
              if name in PARAMETERS and name != "name" and value not in (None, False)}
    params.update({"forcefit": "1"} if args.forcefit else {})
    params.update({"upscale": "1"} if args.upscale else {})
    params.update({"placeholder": "1"} if args.placeholder else {})
    # a file named on the command line, else a name under image_root as in a URL
    path = args.name if os.path.isfile(args.name) else None
    name = os.path.basename(args.name) if path else args.name
    request = Request(path="/" + name, query=urllib.parse.urlencode(params))
    try:
        spec = parse_spec(request, app.config)
        if path:
            source = read_file_source(path, name, app.config)
        else:
            source = open_source(spec, app.config)
        started = time.perf_counter()
        rendered = render(source.data, spec, app.config, app.transforms)
    except HTTPError as error:
        where = "" if path else f" ({args.name} is neither a file nor a name under " \
                                f"{app.config.image_root})"
        print(f"dynimg: {error.status}: {error.message}"
              f"{where if error.status == 404 else ''}", file=sys.stderr)
        return 1
    elapsed = (time.perf_counter() - started) * 1000
    with open(args.output, "wb") as output:
        output.write(rendered.data)
    print(f"{args.name}: {rendered.plan.source[0]}x{rendered.plan.source[1]} -> "
          f"{rendered.width}x{rendered.height} {rendered.format} q{rendered.quality}, "
          f"{len(rendered.data)} bytes, {elapsed:.0f} ms -> {args.output}")
    return 0


COMMANDS = {"serve": _command_serve, "check": _command_check, "render": _command_render,
            "cache": _command_cache, "sign": _command_sign, "html": _command_html,
            "stats": _command_stats}

if __name__ == "__main__":
    sys.exit(main())
