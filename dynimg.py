"""dynimg: an on-the-fly image server for pages that must load fast on slow networks.

Given an image name, a box, and what is known of the client's screen and network
(from the URL or from the browser's client hints), dynimg answers with the
smallest image that still looks right: resized with Pillow(-SIMD), oriented,
converted to sRGB, stripped of metadata and encoded within the byte budget of
the client's network class.

It is one WSGI callable, ``application``, with no dependency beyond the standard
library and Pillow. The HTTP contract is in README.md.

    mod_wsgi-express start-server dynimg.wsgi --mount-point /images
    python dynimg.py serve                       # wsgiref, for a quick local try
    python dynimg.py render sunset.jpg --width 340 --height 400 -o out.jpg

Configuration is ``dynimg.ini``, found through the DYNIMG_CONFIG environment
variable or beside this file.
"""

import argparse
import configparser
import ctypes
import dataclasses
import email.utils
import errno
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
import os
import re
import socket
import ssl
import sys
import tempfile
import threading
import time
import types
import urllib.parse
import warnings
from typing import Optional

from PIL import Image, ImageCms, ImageMath, PngImagePlugin, UnidentifiedImageError

# --- constants and tables ---------------------------------------------------

#: The product's version, shown by /_health.
VERSION = "0.1.0"

#: Part of every image key; raise it whenever the same request would give other bytes.
PROCESSING_VERSION = 1

#: Output formats users may name: Pillow's format name, the media type, alpha support.
FORMATS = {
    "jpeg": ("JPEG", "image/jpeg", False),
    "webp": ("WEBP", "image/webp", True),
    "png": ("PNG", "image/png", True),
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
    "gravity": "one of " + ", ".join(GRAVITIES),
    "upscale": "one of 1, true, yes, 0, false, no",
    "bandwidth": "a network class",
    "screensize": "WxH or a screen name",
    "dpr": "a number from 1 to 4",
    "quality": "an integer from 1 to 100",
    "format": "one of " + ", ".join(FORMATS) + ", auto",
    "bg": "a hex colour such as fff or ffffff",
    "sig": "a hex HMAC-SHA256 signature",
}

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

#: WebP quality = requested (JPEG-scale) quality + this: WebP q85 matches JPEG q80's
#: colour SSIM with 12 % fewer bytes (bench/encoding.py).
WEBP_QUALITY_OFFSET = 5

#: WebP method: 4 is 3 % smaller than 2 at 2.5x the time; 6 saves 4 % more at 2.3x again.
WEBP_METHOD = 4

#: The EXIF tag number of Copyright, kept when [output] keep_copyright is on.
EXIF_COPYRIGHT = 0x8298

#: How many times the byte-budget search may scale an image down before giving up.
BUDGET_SCALE_STEPS = 6

#: Encodes the quality search may spend after the first one.
QUALITY_SEARCH_ENCODES = 3

#: Guesses aim this far under the budget (the curve is typical, not exact), and an
#: answer this full needs no further encode to creep closer.
BUDGET_AIM = 0.95
BUDGET_CLOSE_ENOUGH = 0.85

#: Typical bytes at each quality relative to quality 80: medians over the corpus
#: photos at 360 and 800 px (bench/profiles.py prints how many encodes a
#: budgeted answer then needs). JPEG jumps at 90, where chroma goes 4:4:4.
QUALITY_CURVES = {
    "jpeg": {5: 0.22, 10: 0.25, 15: 0.29, 20: 0.34, 25: 0.393, 30: 0.44, 35: 0.485,
             40: 0.524, 45: 0.566, 50: 0.603, 55: 0.641, 60: 0.687, 65: 0.742, 70: 0.807,
             75: 0.882, 80: 1.0, 85: 1.162, 90: 1.864, 95: 2.713, 100: 4.0},
    "webp": {5: 0.24, 10: 0.27, 15: 0.30, 20: 0.331, 25: 0.367, 30: 0.407, 35: 0.434,
             40: 0.475, 45: 0.502, 50: 0.537, 55: 0.568, 60: 0.599, 65: 0.634, 70: 0.672,
             75: 0.808, 80: 1.0, 85: 1.313, 90: 1.938, 95: 2.9, 100: 4.5},
}

#: Bytes fall about as (linear scale) ** this when an image is scaled down at a
#: fixed quality (1.27-1.9 on the corpus photos, median 1.5); each step refines it.
BYTES_BY_SCALE_EXPONENT = 1.5

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
    },
    "cache": {
        "cache_dir": "/var/tmp/dynimg-cache",
        "cache_max_mb": "1024",
        "fsync": "no",
        "lock_timeout": "30",
    },
    "output": {
        "format": "jpeg",
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
        "allowed_widths": "",
        "max_concurrent_renders": "0",
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
        "max_redirects": "3",
        "refetch_after": "3600",
    },
    "network.default": {"quality": "80", "min_quality": "60", "max_bytes": "0", "max_dpr": "3",
                        "progressive": "no"},
    "network.save-data": {"quality": "45", "min_quality": "30", "max_bytes": "30000",
                          "max_dpr": "1", "progressive": "yes"},
    "network.slow-2g": {"quality": "40", "min_quality": "30", "max_bytes": "10000",
                        "max_dpr": "1", "progressive": "yes"},
    "network.2g": {"quality": "45", "min_quality": "30", "max_bytes": "16000", "max_dpr": "1",
                   "progressive": "yes"},
    "network.3g": {"quality": "65", "min_quality": "45", "max_bytes": "120000", "max_dpr": "2",
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
    cache_dir: str
    cache_max_mb: int
    cache_fsync: bool
    lock_timeout: int
    format: str
    bg: str
    keep_copyright: bool
    png_palette: bool
    max_width: int
    max_height: int
    max_dpr: float
    max_source_bytes: int
    max_source_pixels: int
    allowed_widths: tuple
    max_concurrent_renders: int
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
    max_redirects: int
    refetch_after: int


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
        cache_dir=read.path("cache", "cache_dir"),
        cache_max_mb=read.integer("cache", "cache_max_mb", 1),
        cache_fsync=BOOLEANS[read.choice("cache", "fsync", BOOLEANS)],
        lock_timeout=read.integer("cache", "lock_timeout", 0, 3600),
        format=read.choice("output", "format", FORMATS),
        bg=read.colour("output", "bg"),
        keep_copyright=BOOLEANS[read.choice("output", "keep_copyright", BOOLEANS)],
        png_palette=BOOLEANS[read.choice("output", "png_palette", BOOLEANS)],
        max_width=read.integer("limits", "max_width", 1, 65535),
        max_height=read.integer("limits", "max_height", 1, 65535),
        max_dpr=read.number("limits", "max_dpr", 1, 4),
        max_source_bytes=read.integer("limits", "max_source_bytes", 1),
        max_source_pixels=read.integer("limits", "max_source_pixels", 1),
        allowed_widths=read.numbers("limits", "allowed_widths", int, empty=True),
        max_concurrent_renders=(read.integer("limits", "max_concurrent_renders", 0, 1024)
                                or os.cpu_count() or 2),
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
        max_redirects=read.integer("remote", "max_redirects", 0, 20),
        refetch_after=read.integer("remote", "refetch_after", 1),
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
        if not re.fullmatch(r"\d{1,12}", value) or not low <= int(value) <= (high or 1e13):
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


def configure_logging(config):
    """Send the 'dynimg' logger to the INI's log file (or stderr) at its level."""
    handler = (logging.FileHandler(config.log_file) if config.log_file
               else logging.StreamHandler(sys.stderr))
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    for old in list(log.handlers):
        log.removeHandler(old)
    log.addHandler(handler)
    log.setLevel(config.log_level)
    log.propagate = False


#: PNG text chunks: the most one chunk, and all of them together, may decompress to.
MAX_TEXT_CHUNK = 256 * 1024
MAX_TEXT_MEMORY = 1024 * 1024


def apply_limits(config):
    """Make Pillow itself refuse sources over max_source_pixels, before decoding,
    and PNG text-chunk bombs."""
    Image.MAX_IMAGE_PIXELS = config.max_source_pixels
    warnings.simplefilter("error", Image.DecompressionBombWarning)
    PngImagePlugin.MAX_TEXT_CHUNK = MAX_TEXT_CHUNK
    PngImagePlugin.MAX_TEXT_MEMORY = MAX_TEXT_MEMORY


#: glibc's mallopt() parameters (malloc.h).
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8

#: Allocations from this size get pages of their own, returned to the system when
#: freed. Fixing it also stops glibc raising it after each freed image buffer
#: (up to 32 MiB), which left later image buffers in the heap.
MMAP_THRESHOLD = 1024 * 1024

#: malloc arenas per process: glibc's default (8 a core) lets each render thread
#: fragment an arena of its own; two hold the peak RSS of a soak down by a quarter.
MALLOC_ARENAS = 2


def tune_malloc():
    """Keep a long-running process's memory flat: image buffers are large, short-lived
    and made by several threads at once (bench/soak.py measures it). glibc only.

    Pages of their own cost page faults; GLIBC_TUNABLES=glibc.malloc.hugetlb=1 in
    the server's environment (the Makefile sets it) makes them huge pages."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(_M_ARENA_MAX, MALLOC_ARENAS)
    except (OSError, AttributeError):
        pass  # not glibc: its own defaults stand


# --- request parsing ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Spec:
    """One request, fully resolved: the whole answer to "what image is this?".

    Widths and heights are device pixels (dpr, screen caps and hints folded in).
    The fields from `network` on describe the request, not the bytes: they stay out
    of the key. `source_size` (upright) is filled in once the source is opened.
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
    source_size: Optional[tuple] = None

    def key(self, identity):
        """Hex digest of this spec's canonical form plus the source's identity."""
        fields = [getattr(self, field) for field in _KEY_FIELDS]
        canonical = json.dumps([PROCESSING_VERSION, list(identity), list(fields)])
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]


#: The Spec fields that decide the output bytes (all before `network`).
_FIELD_NAMES = tuple(field.name for field in dataclasses.fields(Spec))
_KEY_FIELDS = _FIELD_NAMES[:_FIELD_NAMES.index("network")]


def parse_spec(environ, config):
    """Turn a WSGI environ into a Spec; raises BadRequest naming the parameter."""
    params = _parse_query(environ.get("QUERY_STRING", ""))
    check_signature(environ, config)
    name, url = _request_source(environ, params, config)
    headers = _Headers(environ)
    network, vary = _choose_network(params, headers, config)
    profile = config.profiles[network]
    dpr, vary = _choose_dpr(params, headers, profile, config, vary)
    width, height, vary = _choose_box(params, headers, dpr, config, vary)
    fit = _choose_fit(params)
    image_format, png_for_alpha, vary = _choose_format(params, headers, config, vary)
    quality = _int_param(params, "quality", 1, 100, profile.quality)
    return Spec(
        name=name, url=url, width=width, height=height, fit=fit,
        gravity=_choice_param(params, "gravity", GRAVITIES, "center") if fit in ("cover", "pad")
        else "center",
        upscale=_bool_param(params, "upscale", False),
        format=image_format, png_for_alpha=png_for_alpha,
        quality=quality, min_quality=min(profile.min_quality, quality),
        max_bytes=profile.max_bytes, progressive=profile.progressive,
        bg=_colour_param(params, "bg", config.bg),
        keep_copyright=config.keep_copyright, png_palette=config.png_palette,
        network=network, dpr=dpr, vary=tuple(sorted(vary)))


def _parse_query(query):
    """Strict query parsing: aliases resolved; unknown, repeated and empty refused."""
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, errors="strict")
    except UnicodeDecodeError:
        raise BadRequest("query: must be UTF-8 text") from None
    params = {}
    for raw_name, value in pairs:
        name = ALIASES.get(raw_name, raw_name)
        if name not in PARAMETERS:
            raise BadRequest(f"{_printable(raw_name)}: unknown parameter; accepted: "
                             + ", ".join(sorted(PARAMETERS)))
        if name in params:
            raise BadRequest(f"{name}: given more than once")
        if not value:
            raise BadRequest(f"{name}: empty; must be {PARAMETERS[name]}")
        params[name] = value
    return types.MappingProxyType(params)


def _request_source(environ, params, config):
    """(name, url): the path form (/images/x.jpg), ?name=, or a remote ?url=."""
    path_name = _path_info(environ).lstrip("/")
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
    return _check_name(name), ""


def _path_info(environ):
    try:
        # PEP 3333 hands PATH_INFO over as latin-1; the URL's bytes were UTF-8.
        return environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8")
    except UnicodeError:
        raise BadRequest("name: the path must be UTF-8 text") from None


def _check_name(name):
    """Refuse names that could only be attempts to leave the image root."""
    parts = name.split("/")
    if ("\x00" in name or "\\" in name or name.startswith("/")
            or any(part == ".." for part in parts)):
        raise BadRequest("name: must be a relative path inside the image root")
    return "/".join(part for part in parts if part not in ("", "."))


class _Headers:
    """Read-only access to request headers by their HTTP names."""

    def __init__(self, environ):
        self.environ = environ

    def get(self, *names):
        """The first of `names` present, as (name, value), else (names[0], None)."""
        for name in names:
            value = self.environ.get("HTTP_" + name.upper().replace("-", "_"))
            if value is not None:
                return name, value.strip()
        return names[0], None


def _choose_network(params, headers, config):
    """The network class: ?bandwidth=, else Save-Data, ECT, then Downlink.

    Vary depends on the URL alone, never on which hints came (Downlink is listed
    even when ECT decided): a cache that keeps one Vary list per URL (Apache's
    mod_cache, many CDNs) loses every variant stored under another list."""
    if "bandwidth" in params:
        network = params["bandwidth"]
        if network not in config.profiles or network in ("default", "save-data"):
            classes = [name for name in config.profiles if name not in ("default", "save-data")]
            raise BadRequest("bandwidth: must be one of " + ", ".join(classes))
        return network, set()
    vary = {"Save-Data", "ECT", "Downlink"}
    if headers.get("Save-Data")[1] in ("on", "?1"):
        return "save-data", vary
    ect = (headers.get("ECT")[1] or "").lower()
    if ect in config.profiles and ect not in ("default", "save-data"):
        return ect, vary
    downlink = _hint_number(headers.get("Downlink")[1], 0, 10000)
    if downlink is None:
        return "default", vary
    return next(name for name, below in config.downlink_classes if downlink < below), vary


def _choose_dpr(params, headers, profile, config, vary):
    """Device pixel ratio: ?dpr=, else the DPR hint snapped up to a step; capped."""
    cap = min(profile.max_dpr, config.max_dpr)
    if "dpr" in params:
        return min(_number_param(params, "dpr", 1, 4), cap), vary
    name, value = headers.get("Sec-CH-DPR", "DPR")
    hinted = _hint_number(value, 0.1, 10)
    if hinted is None:
        return 1.0, vary | {"Sec-CH-DPR", "DPR"}
    return min(_snap_up(hinted, config.dpr_steps), cap), vary | {"Sec-CH-DPR", "DPR"}


def _choose_box(params, headers, dpr, config, vary):
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
        width = _hint_number(headers.get("Sec-CH-Width", "Width")[1], 1, 100000)
        width = width and _snap_up(width, config.width_steps)
    screen, vary = _choose_screen(params, headers, config, vary)
    if screen:
        screen_width, screen_height = (round(side * dpr) for side in screen)
        alone = width is None and height is None
        width = min(width or screen_width, screen_width)
        if height or (alone and "screensize" in params):
            # a named or given screen alone sizes the image to fit it
            height = min(height or screen_height, screen_height)
    return _clamp(width, config.max_width), _clamp(height, config.max_height), vary


def _choose_screen(params, headers, config, vary):
    """The screen in CSS pixels: ?screensize=, else the Viewport-Width hint, else None."""
    if "screensize" in params:
        value = params["screensize"]
        screen = config.screens.get(value) or _parse_screen_size(value)
        if screen is None:
            raise BadRequest("screensize: must be WxH (such as 360x800) or one of "
                             + ", ".join(config.screens))
        return screen, vary
    vary = vary | {"Sec-CH-Viewport-Width", "Viewport-Width"}
    viewport = _hint_number(headers.get("Sec-CH-Viewport-Width", "Viewport-Width")[1],
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


def _choose_format(params, headers, config, vary):
    """The output format; format=auto negotiates with Accept (and varies on it)."""
    if params.get("format") != "auto":
        return _choice_param(params, "format", FORMATS, config.format), False, vary
    accepts_webp = negotiate_webp(headers.get("Accept")[1] or "")
    return ("webp" if accepts_webp else "jpeg"), not accepts_webp, vary | {"Accept"}


def _int_param(params, name, low, high, default):
    value = params.get(name)
    if value is None:
        return default
    if not re.fullmatch(r"\d{1,9}", value) or not low <= int(value) <= high:
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
    match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", text.strip().lower())
    if not match or "0" in (match[1].lstrip("0") or "0", match[2].lstrip("0") or "0"):
        return None
    return int(match[1]), int(match[2])


def _finite_number(text):
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


def negotiate_webp(accept):
    """Whether an Accept header takes image/webp (explicitly, with q > 0)."""
    for item in accept.split(","):
        media, _, params = item.strip().partition(";")
        if media.strip().lower() != "image/webp":
            continue
        match = re.search(r"q\s*=\s*([0-9.]+)", params)
        return not match or (_finite_number(match[1]) or 0) > 0
    return False


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
    message = canonical_request(path, query).encode("utf-8")
    return hmac.new(key.encode("utf-8"), message, hashlib.sha256).hexdigest()


def check_signature(environ, config):
    """With signing keys set, every image request must carry a valid sig (any key)."""
    if not config.signing_keys:
        return
    query = environ.get("QUERY_STRING", "")
    given = [value for name, value in urllib.parse.parse_qsl(query) if name == "sig"]
    expected = [sign(_path_info(environ) or "/", query, key) for key in config.signing_keys]
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
    """Whether an address may be fetched: public, or in an explicitly allowed network."""
    address = ipaddress.ip_address(address)
    if any(address in network for network in allowed_networks):
        return True
    return not (address.is_private or address.is_loopback or address.is_link_local
                or address.is_multicast or address.is_reserved or address.is_unspecified)


def confine(root, name):
    """The real path of `name` under `root`; NotFound if it resolves outside it."""
    path = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, path]) != root:
        raise NotFound("no such image", f"{name!r} resolves outside the image root")
    return path


# --- image pipeline -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Source:
    """An opened source file; `identity` changes whenever its content may have."""

    path: str
    identity: tuple
    mtime: float
    data: bytes = b""


@dataclasses.dataclass(frozen=True)
class Rendered:
    """An encoded image and what it took to make it."""

    data: bytes
    format: str
    width: int
    height: int
    quality: int
    source_size: tuple
    timings: tuple
    animated: bool = False


def stat_source(spec, config):
    """The named source's identity, from a stat, without reading it (for hits and 304s).
    A remote source's identity is its URL and the refetch period it falls in."""
    if spec.url:
        period = int(time.time()) // config.refetch_after
        return Source(spec.url, ("url", spec.url, period), period * config.refetch_after)
    path = confine(config.image_root, spec.name)
    try:
        stat = os.stat(path)
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        raise NotFound("no such image", f"{spec.name!r}: cannot stat") from None
    if not os.path.stat.S_ISREG(stat.st_mode):
        raise NotFound("no such image", f"{spec.name!r} is not a regular file")
    relative = os.path.relpath(path, config.image_root)
    return Source(path, (relative, stat.st_size, stat.st_mtime_ns), stat.st_mtime)


def open_source(spec, config):
    """Read the named source inside the image root, refusing oversize files early."""
    if spec.url:
        source = stat_source(spec, config)
        return dataclasses.replace(source, data=fetch_remote(spec.url, config))
    path = confine(config.image_root, spec.name)
    try:
        with open(path, "rb") as file:
            # fstat of the open file, so the identity matches the bytes we read
            stat = os.fstat(file.fileno())
            if not os.path.stat.S_ISREG(stat.st_mode):
                raise NotFound("no such image", f"{spec.name!r} is not a regular file")
            if stat.st_size > config.max_source_bytes:
                raise Unprocessable("source is larger than max_source_bytes")
            data = file.read(config.max_source_bytes + 1)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError):
        raise NotFound("no such image", f"{spec.name!r}: cannot open") from None
    if len(data) > config.max_source_bytes:
        raise Unprocessable("source is larger than max_source_bytes")
    relative = os.path.relpath(path, config.image_root)
    return Source(path, (relative, stat.st_size, stat.st_mtime_ns), stat.st_mtime, data)


def fetch_remote(url, config):
    """GET a remote source safely: allowed hosts only, each resolved once and checked
    (no private, loopback, link-local, multicast or reserved address unless allowed),
    connected to by that checked address, redirects re-checked, body capped."""
    for _ in range(config.max_redirects + 1):
        parts = urllib.parse.urlsplit(check_remote_url(url, config))
        address = _checked_address(parts, config)
        response, connection = _remote_get(parts, address, config)
        try:
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                url = urllib.parse.urljoin(url, response.getheader("Location"))
                continue
            if response.status == 404:
                raise NotFound("no such image", f"remote {url} answered 404")
            if response.status != 200:
                raise BadGateway("remote source answered with an error",
                                 f"remote {url} answered {response.status}")
            return _read_capped(response, config)
        finally:
            connection.close()
    raise BadGateway("remote source redirects too often")


def _checked_address(parts, config):
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise BadGateway("remote host does not resolve") from None
    address = infos[0][4][0]
    if not is_public_address(address, config.allowed_networks):
        raise Forbidden("url: the remote host's address is not allowed")
    return address


def _remote_get(parts, address, config):
    """One GET over a connection to the address already checked (no second lookup)."""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    connection = _PinnedConnection(parts.hostname, port, address, parts.scheme == "https",
                                   config.connect_timeout, config.read_timeout)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        connection.request("GET", path, headers={"User-Agent": f"dynimg/{VERSION}",
                                                 "Accept": "image/*"})
        return connection.getresponse(), connection
    except TimeoutError:
        connection.close()
        raise GatewayTimeout("remote source timed out") from None
    except (OSError, http.client.HTTPException) as error:
        connection.close()
        raise BadGateway("remote source is unreachable", repr(error)) from None


def _read_capped(response, config):
    declared = response.getheader("Content-Length")
    if declared and declared.isdigit() and int(declared) > config.max_source_bytes:
        raise Unprocessable("source is larger than max_source_bytes")
    chunks, total = [], 0
    try:
        while chunk := response.read(65536):
            total += len(chunk)
            if total > config.max_source_bytes:
                raise Unprocessable("source is larger than max_source_bytes")
            chunks.append(chunk)
    except TimeoutError:
        raise GatewayTimeout("remote source timed out") from None
    except (OSError, http.client.HTTPException) as error:
        raise BadGateway("remote source broke off", repr(error)) from None
    return b"".join(chunks)


class _PinnedConnection(http.client.HTTPConnection):
    """An HTTP(S) connection to a fixed, checked address, with the URL's host name
    for Host and TLS (so DNS cannot be asked twice and answer differently)."""

    def __init__(self, host, port, address, tls, connect_timeout, read_timeout):
        super().__init__(host, port, timeout=read_timeout)
        self.address, self.tls, self.connect_timeout = address, tls, connect_timeout

    def connect(self):
        self.sock = socket.create_connection((self.address, self.port), self.connect_timeout)
        self.sock.settimeout(self.timeout)
        if self.tls:
            context = ssl.create_default_context()
            self.sock = context.wrap_socket(self.sock, server_hostname=self.host)


class RenderSlots:
    """At most max_concurrent_renders renders at once in this process; a request
    that cannot get a slot within queue_timeout is turned away (503), so load
    cannot pile up memory."""

    def __init__(self, count, timeout):
        self.semaphore = threading.BoundedSemaphore(count)
        self.timeout = timeout

    def __enter__(self):
        if not self.semaphore.acquire(timeout=self.timeout):
            raise Busy("busy: try again shortly")

    def __exit__(self, *exc_info):
        self.semaphore.release()


_render_slots = {}


def render_slots(config):
    """This process's render slots for this config."""
    key = (config.max_concurrent_renders, config.queue_timeout)
    if key not in _render_slots:
        _render_slots[key] = RenderSlots(*key)
    return _render_slots[key]


def open_image(data, config):
    """Open (lazily) and check the pixel count before any pixel is decoded."""
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise Unprocessable("source is larger than max_source_pixels") from None
    except UnidentifiedImageError:
        raise Unprocessable("source is not an image format this server reads") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise Unprocessable("source is not a decodable image", repr(error)) from None
    if image.width * image.height > config.max_source_pixels:
        raise Unprocessable("source is larger than max_source_pixels")
    return image


def render(source_data, spec, config):
    """Decode, run the pipeline, encode within budget. Returns Rendered."""
    started = time.perf_counter()
    image = open_image(source_data, config)
    source_size, source_format = image.size, image.format
    animated, copyright_line = _is_animated(image), _copyright(image, spec)
    # the geometry follows the source's own size, not the draft's rounded one
    spec = dataclasses.replace(spec, source_size=_upright_size(image))
    try:
        image = decode(image, spec)
        decoded = time.perf_counter()
        for step in PIPELINE:
            image = step(image, spec)
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError) as error:
        # Pillow reports broken files through these, from whichever step first reads pixels.
        raise Unprocessable(f"source is a {source_format} file this server cannot decode",
                            repr(error)) from None
    resized = time.perf_counter()
    data, image, quality = encode(image, spec, copyright_line)
    finished = time.perf_counter()
    timings = (("decode", decoded - started), ("resize", resized - decoded),
               ("encode", finished - resized))
    return Rendered(data, spec.format if not _wants_png(image, spec) else "png",
                    image.width, image.height, quality, source_size, timings, animated)


def _is_animated(image):
    """Whether the source has frames after the first (which alone is served)."""
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
    try:
        value = image.getexif().get(EXIF_COPYRIGHT)
    except Exception:  # broken EXIF: nothing to keep
        return None
    return str(value).strip("\x00 ")[:200] or None if value else None


def _upright_size(image):
    """The source's size as a person sees it, after its EXIF orientation."""
    width, height = image.size
    return (height, width) if _orientation(image) in (5, 6, 7, 8) else (width, height)


def _orientation(image):
    """The EXIF orientation, 1 when absent, invalid or unreadable (never an error)."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # any broken EXIF block means "no orientation", by design
        return 1
    return value if value in ORIENTATIONS else 1


def output_geometry(size, spec):
    """(resized size, final size) for an upright source of `size` under `spec`."""
    width, height = size
    box_width, box_height = spec.width, spec.height
    if not box_width and not box_height:
        return size, size
    if spec.fit == "fill" and box_width and box_height:
        return (box_width, box_height), (box_width, box_height)
    scales = [side / source for side, source in ((box_width, width), (box_height, height)) if side]
    scale = max(scales) if spec.fit == "cover" and len(scales) == 2 else min(scales)
    if not spec.upscale:
        scale = min(scale, 1.0)
    resized = (_whole_pixels(width * scale), _whole_pixels(height * scale))
    if spec.fit == "cover" and box_width and box_height:
        return resized, (min(box_width, resized[0]), min(box_height, resized[1]))
    if spec.fit == "pad":
        return resized, (box_width or resized[0], box_height or resized[1])
    return resized, resized


def _whole_pixels(length):
    """Round half up (266.5 -> 267, as people expect), and never below 1 px."""
    return max(1, math.floor(length + 0.5))


def decode(image, spec):
    """Shrink-on-load (JPEG DCT scaling to about the target size), then decode."""
    if image.format == "JPEG" and (spec.width or spec.height):
        (width, height), _ = output_geometry(_upright_size(image), spec)
        if _orientation(image) in (5, 6, 7, 8):
            width, height = height, width
        image.draft(None, (math.ceil(width * DRAFT_FACTOR), math.ceil(height * DRAFT_FACTOR)))
    # the source is in memory already: hand it to the decoder whole, not in 64 KiB
    # pieces (each piece a suspension and resumption of libjpeg; 1-3 % faster)
    image.decodermaxblock = max(image.decodermaxblock, MAX_DECODER_BLOCK)
    image.load()
    return image


def orient(image, spec):
    """Apply the EXIF orientation, so width and height mean the upright image."""
    transpose = ORIENTATIONS.get(_orientation(image))
    return image.transpose(transpose) if transpose is not None else image


def to_srgb(image, spec):
    """Bring any mode and embedded profile to sRGB (or grey) 8-bit, keeping alpha."""
    profile = image.info.get("icc_profile")
    image = _to_working_mode(image)
    if profile and image.mode in ("RGB", "RGBA", "CMYK", "L", "LA"):
        image = _apply_profile(image, profile)
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


def _apply_profile(image, profile_bytes):
    """Convert from an embedded ICC profile to sRGB; an unusable profile is ignored."""
    alpha = image.getchannel("A") if image.mode in ("RGBA", "LA") else None
    base = image.convert(image.mode[:-1]) if alpha else image
    try:
        transform = _srgb_transform(profile_bytes, base.mode)
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


#: LittleCMS transforms to sRGB, by (profile digest, mode): built once per profile.
_transforms = {}

_SRGB_PROFILE = ImageCms.createProfile("sRGB")


def _srgb_transform(profile_bytes, mode):
    """A cached transform from this profile to sRGB; None when none is needed."""
    digest = (hashlib.sha1(profile_bytes).digest(), mode)
    if digest not in _transforms:
        source = ImageCms.ImageCmsProfile(io.BytesIO(profile_bytes))
        space = source.profile.xcolor_space.strip()
        expected = {"L": "GRAY", "RGB": "RGB", "CMYK": "CMYK"}[mode]
        if space != expected or _is_srgb(source):
            _transforms[digest] = None
        else:
            _transforms[digest] = ImageCms.buildTransform(
                source, _SRGB_PROFILE, mode, "RGB",
                renderingIntent=ImageCms.Intent.PERCEPTUAL)
    return _transforms[digest]


def _is_srgb(profile):
    description = (profile.profile.profile_description or "").lower()
    return "srgb" in description


def resize(image, spec):
    """One resample to the planned size (premultiplied alpha, done by Pillow)."""
    size, _ = output_geometry(spec.source_size or image.size, spec)
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=REDUCING_GAP)


def crop_or_pad(image, spec):
    """`cover` crops the overflow by gravity; `pad` centres the image on bg."""
    if spec.fit not in ("cover", "pad"):
        return image
    final = (spec.width or image.width, spec.height or image.height)
    if spec.fit == "cover":
        final = (min(final[0], image.width), min(final[1], image.height))
    if final == image.size:
        return image
    across, down = GRAVITIES[spec.gravity]
    left = round((image.width - final[0]) * across)
    top = round((image.height - final[1]) * down)
    if spec.fit == "cover":
        return image.crop((left, top, left + final[0], top + final[1]))
    mode = image.mode if image.mode in ("RGB", "RGBA") else "RGBA"
    canvas = Image.new(mode, final, "#" + spec.bg)
    canvas.paste(image.convert("RGBA"), (-left, -top), image.convert("RGBA"))
    return canvas


def flatten(image, spec):
    """Put transparent pixels on bg where the output format has no alpha."""
    if image.mode not in ("RGBA", "LA") or _keeps_alpha(image, spec):
        return image
    background = Image.new("RGB", image.size, "#" + spec.bg)
    background.paste(image, mask=image.getchannel("A"))
    if image.mode == "LA" and len(set(bytes.fromhex(spec.bg))) == 1:
        return background.convert("L")
    return background


def _keeps_alpha(image, spec):
    return FORMATS[spec.format][2] or _wants_png(image, spec)


def _wants_png(image, spec):
    return spec.png_for_alpha and image.mode in ("RGBA", "LA")


#: The image work, in order; each step is (image, spec) -> image.
PIPELINE = (orient, to_srgb, resize, crop_or_pad, flatten)


def encode(image, spec, copyright_line=None):
    """Encode, then keep within the byte budget: lower quality, then scale down.

    Returns (bytes, the image encoded, the quality used).
    """
    image.info = {}  # nothing of the source's metadata (EXIF, XMP, ICC, comments) goes out
    if copyright_line:
        image.info["exif"] = _copyright_exif(copyright_line)
    data = _save(image, spec, spec.quality)
    if not spec.max_bytes or len(data) <= spec.max_bytes or not _is_lossy(image, spec):
        return data, image, spec.quality
    data, quality, size = _search_quality(image, spec, len(data))
    exponent = BYTES_BY_SCALE_EXPONENT
    for _ in range(BUDGET_SCALE_STEPS):
        if size <= spec.max_bytes or min(image.size) <= 16:
            break
        scale = min(0.95, (spec.max_bytes * BUDGET_AIM / size) ** (1 / exponent))
        smaller = image.resize((max(1, round(image.width * scale)),
                                max(1, round(image.height * scale))), Image.Resampling.LANCZOS)
        smaller.info = {"exif": _copyright_exif(copyright_line)} if copyright_line else {}
        data = _save(smaller, spec, quality)
        # learn how this image's bytes follow its scale, for a further step
        if 0 < len(data) < size:
            exponent = max(1.0, math.log(len(data) / size) / math.log(smaller.width / image.width))
        image, size = smaller, len(data)
    if size > spec.max_bytes:
        log.warning("cannot fit %s into %d bytes: sending %d bytes at %dx%d",
                    spec.name, spec.max_bytes, size, image.width, image.height)
    return data, image, quality


def _search_quality(image, spec, first_size):
    """The highest quality that fits the budget, in a few encodes: each guess reads
    the typical bytes-by-quality curve from the nearest encode known too large.

    Returns (bytes or None, quality, their size); bytes are None when even
    min_quality is predicted too large (the caller scales down without them).
    """
    curve = QUALITY_CURVES["webp" if spec.format == "webp" else "jpeg"]
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
        data = _save(image, spec, quality)
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
    data = _save(image, spec, spec.min_quality)
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


def _is_lossy(image, spec):
    return not _wants_png(image, spec) and spec.format in ("jpeg", "webp")


def _copyright_exif(copyright_line):
    exif = Image.Exif()
    exif[EXIF_COPYRIGHT] = copyright_line
    return exif.tobytes()


def _save(image, spec, quality):
    """Encode with settings per format (chosen in bench/encoding.py); the only
    metadata written is what encode() put in image.info."""
    buffer = io.BytesIO()
    exif = image.info.get("exif", b"")
    if _wants_png(image, spec) or spec.format == "png":
        if spec.png_palette:
            image = image.quantize(256, method=Image.Quantize.FASTOCTREE
                                   if image.mode in ("RGBA", "LA") else Image.Quantize.MEDIANCUT)
        image.save(buffer, "PNG", optimize=True, exif=exif)
    elif spec.format == "webp":
        image.save(buffer, "WEBP", quality=min(100, quality + WEBP_QUALITY_OFFSET),
                   method=WEBP_METHOD, exif=exif)
    else:
        image.save(buffer, "JPEG", quality=quality, optimize=True, exif=exif,
                   progressive=spec.progressive
                   and image.width * image.height >= PROGRESSIVE_MIN_PIXELS,
                   subsampling="4:4:4" if quality >= FULL_CHROMA_QUALITY else "4:2:0")
    return buffer.getvalue()


# --- result cache -------------------------------------------------------------

#: Magic bytes at the start and end of a whole file of each format (a cut file fails).
_FORMAT_CHECKS = {
    "jpeg": lambda head, tail, size: head[:2] == b"\xff\xd8" and tail[-2:] == b"\xff\xd9",
    "png": lambda head, tail, size: head[:8] == b"\x89PNG\r\n\x1a\n" and tail[-8:-4] == b"IEND",
    "webp": lambda head, tail, size: head[:4] == b"RIFF" and head[8:12] == b"WEBP"
    and int.from_bytes(head[4:8], "little") + 8 == size,
}

#: Server-Timing of an answer from the result cache.
CACHE_HIT_TIMING = "cache;desc=hit"

#: A hit refreshes its entry's mtime (the LRU clock) at most this often, in seconds.
TOUCH_INTERVAL = 3600

#: Pruning trims the cache to this fraction of cache_max_mb, so it does not run at once again.
PRUNE_TO = 0.9


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """An encoded result on disk; everything a response needs is in its file name:
    KEY.SOURCE.WxH.qQUALITY.FRAMES.LENGTH.FORMAT"""

    key: str
    source: str
    width: int
    height: int
    quality: int
    animated: bool
    length: int
    format: str

    @property
    def name(self):
        return (f"{self.key}.{self.source}.{self.width}x{self.height}.q{self.quality}."
                f"{'a' if self.animated else 's'}.{self.length}.{self.format}")

    @classmethod
    def parse(cls, name):
        try:
            key, source, size, quality, frames, length, fmt = name.split(".")
            width, height = size.split("x")
            return cls(key, source, int(width), int(height), int(quality[1:]), frames == "a",
                       int(length), fmt)
        except ValueError:
            return None


def source_tag(relative_path):
    """Short digest naming a source in cache file names, so purge can find its variants."""
    return hashlib.sha256(relative_path.encode()).hexdigest()[:12]


class ResultCache:
    """Encoded results under cache_dir by image key: atomic writes, LRU trimming."""

    def __init__(self, config):
        self.folder = config.cache_dir
        self.max_bytes = config.cache_max_mb * 1024 * 1024
        self.fsync = config.cache_fsync
        self.lock_timeout = config.lock_timeout
        self.hits = self.misses = 0
        self.written = 0
        self.last_prune = time.monotonic()
        self.pruning = threading.Lock()
        self.write_failed = False

    def _folder_of(self, key):
        return os.path.join(self.folder, key[:2], key[2:4])

    def lookup(self, key):
        """(entry, open file) for a sound cached result, else None; a bad file is removed."""
        folder = self._folder_of(key)
        try:
            names = [name for name in os.listdir(folder) if name.startswith(key + ".")]
        except OSError:
            names = []
        entry = CacheEntry.parse(names[0]) if names else None
        if entry is None or entry.format not in _FORMAT_CHECKS:
            self.misses += 1
            return None
        path = os.path.join(folder, entry.name)
        try:
            file = open(path, "rb")
        except OSError:
            self.misses += 1
            return None
        if not self._is_sound(file, entry):
            file.close()
            log.warning("removing a damaged cache file %s", path)
            self._remove(path)
            self.misses += 1
            return None
        self.hits += 1
        return entry, file

    def _is_sound(self, file, entry):
        stat = os.fstat(file.fileno())
        if stat.st_size != entry.length or stat.st_size < 12:
            return False
        head = os.pread(file.fileno(), 12, 0)
        tail = os.pread(file.fileno(), 12, stat.st_size - 12)
        if time.time() - stat.st_mtime > TOUCH_INTERVAL:
            try:
                os.utime(file.fileno())
            except OSError:
                pass  # a read-only cache still serves
        return _FORMAT_CHECKS[entry.format](head, tail, stat.st_size)

    def store(self, entry, data):
        """Write atomically (a temporary file in the same folder, then rename)."""
        folder = self._folder_of(entry.key)
        temporary = None
        try:
            os.makedirs(folder, exist_ok=True)
            descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-")
            with os.fdopen(descriptor, "wb") as file:
                file.write(data)
                if self.fsync:
                    file.flush()
                    os.fsync(file.fileno())
            os.chmod(temporary, 0o644)
            os.rename(temporary, os.path.join(folder, entry.name))
        except OSError as error:
            if temporary:
                self._remove(temporary)
            if not self.write_failed or error.errno != errno.ENOSPC:
                log.warning("result cache write failed (%s): serving uncached", error)
            self.write_failed = True
            return
        self.write_failed = False
        self.written += len(data)
        self._maybe_prune()

    def lock(self, key):
        """A cross-process lock for one key, so one render makes it and others wait."""
        return _StripeLock(os.path.join(self.folder, ".locks", key[:3]), self.lock_timeout)

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
                path = os.path.join(folder, name)
                try:
                    yield path, CacheEntry.parse(name), os.stat(path)
                except OSError:
                    continue  # removed meanwhile

    def prune(self):
        """Trim to PRUNE_TO of the bound, least recently used first; drop stale temporaries.
        Removing a file being served is safe: the reader keeps its open descriptor."""
        with _StripeLock(os.path.join(self.folder, ".locks", "prune"), 0) as locked:
            if not locked:
                return 0
            files, removed = [], 0
            for path, entry, stat in self.entries():
                if entry is None:
                    if time.time() - stat.st_mtime > 3600:
                        removed += self._remove(path)
                    continue
                files.append((stat.st_mtime, stat.st_size, path))
            total = sum(size for _, size, _ in files)
            for _, size, path in sorted(files):
                if total <= self.max_bytes * PRUNE_TO:
                    break
                removed += self._remove(path)
                total -= size
            return removed

    def purge(self, relative_path):
        """Remove every variant of one source."""
        tag = source_tag(relative_path)
        return sum(self._remove(path) for path, entry, _ in list(self.entries())
                   if entry and entry.source == tag)

    def stats(self):
        sizes = [stat.st_size for _, entry, stat in self.entries() if entry]
        lookups = self.hits + self.misses
        return {"dir": self.folder, "entries": len(sizes), "bytes": sum(sizes),
                "max_bytes": self.max_bytes, "hits": self.hits, "misses": self.misses,
                "hit_ratio": round(self.hits / lookups, 3) if lookups else None}

    @staticmethod
    def _remove(path):
        try:
            os.unlink(path)
            return 1
        except OSError:
            return 0


class _StripeLock:
    """flock on one of a bounded set of lock files; gives up after `timeout` seconds
    (then the caller goes on unlocked: a duplicate render beats a stuck request)."""

    def __init__(self, path, timeout):
        self.path, self.timeout, self.file = path, timeout, None

    def __enter__(self):
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self.file = open(self.path, "a+b")
        except OSError:
            return False
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(0.02)

    def __exit__(self, *exc_info):
        if self.file:
            self.file.close()  # closing releases the lock


_result_cache = None


def result_cache(config):
    """This process's ResultCache, or None when cache_dir is empty."""
    global _result_cache
    if not config.cache_dir:
        return None
    if _result_cache is None or _result_cache.folder != config.cache_dir:
        _result_cache = ResultCache(config)
    return _result_cache


# --- responses ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Response:
    """Status, headers and a body: bytes, or an open file of `length` bytes."""

    status: int
    headers: tuple
    body: object = b""
    length: Optional[int] = None


def image_response(spec, source, entry, config, body, timing):
    """200 with the image (bytes, or an open cache file that goes out through
    wsgi.file_wrapper) and every header caches and browsers need."""
    headers = _image_headers(spec, config, FORMATS[entry.format][1]) + _validators(
        entry.key, source) + (
        ("Server-Timing", timing),
        ("X-Image-Size", f"{entry.width}x{entry.height}"),
        ("X-Image-Quality", str(entry.quality)),
        ("X-Image-Network", spec.network),
    ) + ((("X-Image-Frames", "first (the source is animated)"),) if entry.animated else ())
    return Response(200, headers, body, entry.length)


def not_modified_response(spec, source, config, key):
    return Response(304, _image_headers(spec, config, None) + _validators(key, source))


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


def error_response(error, spec, config):
    """The one place an HTTPError becomes a response."""
    headers = (("Cache-Control", f"public, max-age={config.error_max_age}"),)
    if isinstance(error, MethodNotAllowed):
        return Response(405, headers + (("Allow", "GET, HEAD"), ("Content-Type", "text/plain")))
    if isinstance(error, Busy):
        headers = (("Cache-Control", "no-store"), ("Retry-After", "2"))
    if error.image is None:
        return Response(error.status, headers + (("Content-Type", "text/plain; charset=utf-8"),),
                        (error.message + "\n").encode())
    data, content_type = _error_image(getattr(config, error.image), spec, config)
    if error.status != 404:
        headers += (("X-Image-Error", error.message),)
    if spec and spec.vary:
        headers += (("Vary", ", ".join(spec.vary)),)
    return Response(error.status, headers + (("Content-Type", content_type),), data)


def _error_image(path, spec, config):
    """The error picture fitted to the request, or as it is if that fails too."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError:
        log.exception("cannot read the error image %s", path)
        return b"", "image/png"
    if spec is None:
        return data, "image/png"
    try:
        rendered = render(data, dataclasses.replace(spec, upscale=True, max_bytes=0), config)
    except Exception:
        log.exception("cannot render the error image %s", path)
        return data, "image/png"
    return rendered.data, FORMATS[rendered.format][1]


def health_response(config):
    """JSON about this server: version, Pillow build, config in use."""
    body = json.dumps({
        "status": "ok",
        "version": VERSION,
        "pillow": pillow_build(),
        "config": config.path,
        "image_root": config.image_root,
        "cache": result_cache(config).stats() if result_cache(config) else None,
    }, indent=2).encode() + b"\n"
    return Response(200, (("Content-Type", "application/json"),
                          ("Cache-Control", "no-store")), body)


#: The classes the demo page shows side by side, slowest first.
DEMO_CLASSES = ("slow-2g", "2g", "3g", "4g", "wifi")

#: Typical throughput of each class in kbit/s (the Network Information API's
#: ECT figures; 4g and wifi are ordinary figures), for the demo's arrival times.
TYPICAL_KBITS = {"slow-2g": 50, "2g": 70, "3g": 700, "4g": 4000, "wifi": 20000}


def demo_response(environ, config):
    """An HTML page showing one image as each network class would receive it."""
    if config.signing_keys:
        # the demo renders any name and size: with signed URLs, it would bypass them
        raise Forbidden("the demo page is off while URLs must be signed")
    params = _parse_query(environ.get("QUERY_STRING", ""))
    width = _int_param(params, "width", 1, config.max_width, 640)
    if "name" not in params:
        raise BadRequest("name: required, such as /_demo?name=sunset.jpg")
    base = environ.get("SCRIPT_NAME", "") + "/" + urllib.parse.quote(_check_name(params["name"]))
    figures = [_demo_figure(environ, config, base, f"bandwidth={network}&width={width}",
                            network) for network in DEMO_CLASSES if network in config.profiles]
    yours = _demo_figure(environ, config, base, f"width={width}", "yours", panel=True)
    body = DEMO_PAGE.format(name=html.escape(params["name"]), width=width,
                            figures="\n".join(figures), yours=yours).encode()
    hints = ", ".join(CLIENT_HINTS)
    return Response(200, (("Content-Type", "text/html; charset=utf-8"),
                          ("Accept-CH", hints), ("Critical-CH", "ECT, Save-Data, Sec-CH-DPR"),
                          ("Vary", ", ".join(_DEMO_VARY)),
                          ("Cache-Control", "no-store")), body)


#: The hints the demo page itself reads (it shows what this browser selected).
_DEMO_VARY = ("ECT", "Downlink", "Save-Data", "Sec-CH-DPR", "DPR", "Sec-CH-Viewport-Width",
              "Viewport-Width")


def _demo_figure(environ, config, base, query, label, panel=False):
    """One <figure>: the image URL and what the server sends for it, rendered here."""
    request = dict(environ, PATH_INFO=base[len(environ.get("SCRIPT_NAME", "")):],
                   QUERY_STRING=query)
    spec = parse_spec(request, config)
    rendered = render(open_source(spec, config).data, spec, config)
    seconds = len(rendered.data) * 8 / 1000 / TYPICAL_KBITS.get(spec.network, 4000)
    facts = (f'<span class="network">{html.escape(spec.network)}</span>: '
             f'<span class="bytes">{len(rendered.data):,}</span> bytes, '
             f'{rendered.width}×{rendered.height} px, quality {rendered.quality}, '
             f'~{seconds:.1f} s at {spec.network if spec.network in TYPICAL_KBITS else "4g"}')
    if panel:
        facts += (f'<br>dpr {spec.dpr:g}; this URL varies on: '
                  f'{html.escape(", ".join(spec.vary) or "nothing")}')
    url = html.escape(f"{base}?{query}")
    return (f'<figure id="{label}"><img src="{url}" alt="{label}">'
            f'<figcaption><a href="{url}"><code>{url}</code></a><br>{facts}</figcaption></figure>')


DEMO_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>dynimg: {name} on every network</title>
<style>
body {{ font: 15px/1.4 system-ui, sans-serif; margin: 1.5em; color: #263238; }}
main {{ display: flex; flex-wrap: wrap; gap: 1.2em; align-items: flex-start; }}
figure {{ margin: 0; width: 300px; }}
figure img {{ width: 300px; height: auto; background: #eceff1; display: block; }}
figcaption {{ font-size: 13px; margin-top: .4em; }}
figcaption code {{ font-size: 11px; word-break: break-all; }}
#panel {{ background: #eceff1; padding: 1em; margin-bottom: 1.5em; }}
.network {{ font-weight: bold; }}
</style></head><body>
<h1>{name}, {width} CSS px wide, as each network class receives it</h1>
<section id="panel"><h2>Your browser</h2>
<p>Without <code>bandwidth=</code> in the URL, dynimg reads your browser's client hints
(ECT, Downlink, Save-Data, DPR, Viewport-Width). They selected:</p>
{yours}
</section>
<main>
{figures}
</main>
</body></html>
"""


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


# --- WSGI application -----------------------------------------------------------

_config = None


def get_config():
    """The config, loaded (and logging set up) on first use in this process."""
    global _config
    if _config is None:
        config = load_config()
        configure_logging(config)
        apply_limits(config)
        tune_malloc()
        _config = config
    return _config


def serve_image(spec, environ, config):
    """Answer one image request: 304 if the client has it, else from the result
    cache, else render (one render per key at a time) and keep the result."""
    source = stat_source(spec, config)
    key = spec.key(source.identity)
    if _client_has_it(environ, key, source):
        return not_modified_response(spec, source, config, key)
    cache = result_cache(config)
    if cache is None:
        return render_response(spec, open_source(spec, config), config)
    hit = cache.lookup(key)
    if hit is None:
        with cache.lock(key):
            hit = cache.lookup(key)  # another process may have made it while we waited
            if hit is None:
                return render_response(spec, open_source(spec, config), config, cache)
    entry, file = hit
    return image_response(spec, source, entry, config, file, CACHE_HIT_TIMING)


def _client_has_it(environ, key, source):
    """If-None-Match decides when sent; otherwise If-Modified-Since."""
    if_none_match = environ.get("HTTP_IF_NONE_MATCH")
    if if_none_match is not None:
        return is_not_modified(if_none_match, f'"{key}"')
    if_modified_since = environ.get("HTTP_IF_MODIFIED_SINCE")
    return if_modified_since is not None and not is_modified_since(if_modified_since,
                                                                   source.mtime)


def render_response(spec, source, config, cache=None):
    """Render (keyed by the identity of the bytes actually read) and keep the result."""
    key = spec.key(source.identity)
    with render_slots(config):
        rendered = render(source.data, spec, config)
    entry = CacheEntry(key, source_tag(spec.url or source.identity[0]), rendered.width,
                       rendered.height, rendered.quality, rendered.animated,
                       len(rendered.data), rendered.format)
    if cache is not None:
        cache.store(entry, rendered.data)
    timing = ", ".join(f"{name};dur={seconds * 1000:.1f}" for name, seconds in rendered.timings)
    return image_response(spec, source, entry, config, rendered.data, timing)


#: Paths that are the server's own pages rather than image names.
PAGES = {"/_health": lambda environ, config: health_response(config),
         "/_demo": demo_response}


def handle(environ, config, parsed):
    """Route one request to a page or an image; `parsed` receives the spec."""
    if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
        raise MethodNotAllowed("method not allowed")
    path = environ.get("PATH_INFO", "")
    if path.startswith("/_"):
        page = PAGES.get(path)
        if page is None:
            raise NotFound("no such page")
        return page(environ, config)
    parsed.append(parse_spec(environ, config))
    return serve_image(parsed[0], environ, config)


def application(environ, start_response):
    """The WSGI callable: parse, handle, turn errors into responses, respond."""
    started = time.perf_counter()
    config = get_config()
    parsed = []
    try:
        response = handle(environ, config, parsed)
    except HTTPError as error:
        if error.status >= 500 or error.detail != error.message:
            log.info("%s: %s", error.status, error.detail)
        response = error_response(error, parsed[0] if parsed else None, config)
    except MemoryError:
        raise
    except Exception:
        log.exception("unexpected error for %s?%s", environ.get("PATH_INFO"),
                      environ.get("QUERY_STRING"))
        response = error_response(InternalError("internal error"),
                                  parsed[0] if parsed else None, config)
    length = response.length if response.length is not None else len(response.body)
    headers = list(response.headers)
    if response.status != 304:
        # a 304's Content-Length would describe the image, not this empty answer; a
        # wrong one makes caches (Apache's mod_cache) throw their stored copy away
        headers.append(("Content-Length", str(length)))
    start_response(f"{response.status} {http.HTTPStatus(response.status).phrase}", headers)
    headers_out = dict(response.headers)
    log.info("%s %s?%s %d %d bytes net=%s cache=%s key=%s %.0f ms",
             environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"),
             environ.get("QUERY_STRING", ""), response.status, length,
             parsed[0].network if parsed else "-",
             "hit" if headers_out.get("Server-Timing") == CACHE_HIT_TIMING else "-",
             headers_out.get("X-Image-Key", "-"), (time.perf_counter() - started) * 1000)
    if environ.get("REQUEST_METHOD") == "HEAD" or response.status == 304:
        if hasattr(response.body, "close"):
            response.body.close()
        return []
    if hasattr(response.body, "read"):
        file_wrapper = environ.get("wsgi.file_wrapper")
        return file_wrapper(response.body, 65536) if file_wrapper else _chunks(response.body)
    return [response.body]


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
    sign_command.add_argument("url", help='such as "/images/sunset.jpg?width=300"')
    sign_command.add_argument("--mount", default="/images", help="where the app is mounted")
    cache = commands.add_parser("cache", help="the result cache: stats, purge NAME, prune")
    cache.add_argument("action", choices=("stats", "purge", "prune"))
    cache.add_argument("name", nargs="?", help="with purge: the source whose variants go")
    render_command = commands.add_parser("render", help="run the pipeline on one image offline")
    render_command.add_argument("name")
    render_command.add_argument("-o", "--output", required=True)
    for option in ("width", "height", "fit", "gravity", "quality", "format", "bandwidth",
                   "screensize", "dpr", "bg"):
        render_command.add_argument("--" + option)
    render_command.add_argument("--forcefit", action="store_true")
    render_command.add_argument("--upscale", action="store_true")
    args = parser.parse_args(argv)
    if args.config:
        os.environ["DYNIMG_CONFIG"] = os.path.abspath(args.config)
    try:
        config = get_config()
    except ConfigError as error:
        print(f"dynimg: {error}", file=sys.stderr)
        return 2
    return COMMANDS[args.command](args, config)


def _command_check(args, config):
    print(f"{config.path}: ok (image root {config.image_root})")
    return 0


def _command_sign(args, config):
    if not config.signing_keys:
        print("dynimg: no signing_key is set in [security]", file=sys.stderr)
        return 1
    path, _, query = args.url.partition("?")
    path = urllib.parse.unquote(path)
    inside = path[len(args.mount):] if path.startswith(args.mount) else path
    signature = sign(inside or "/", query, config.signing_keys[0])
    print(f"{args.url}{'&' if query else '?'}sig={signature}")
    return 0


def _command_cache(args, config):
    cache = result_cache(config)
    if cache is None:
        print("dynimg: the result cache is off (cache_dir is empty)", file=sys.stderr)
        return 1
    if args.action == "purge":
        if not args.name:
            print("dynimg: cache purge needs the source's name", file=sys.stderr)
            return 2
        print(f"removed {cache.purge(_check_name(args.name))} cached variants of {args.name}")
    elif args.action == "prune":
        print(f"removed {cache.prune()} files; bound {cache.max_bytes // 1048576} MiB")
    stats = cache.stats()
    print(f"{stats['dir']}: {stats['entries']} entries, {stats['bytes'] / 1048576:.1f} MiB "
          f"of {stats['max_bytes'] // 1048576} MiB")
    return 0


def _command_serve(args, config):
    from wsgiref.simple_server import make_server, WSGIRequestHandler

    def mounted(environ, start_response):
        # mimic WSGIScriptAlias /images: the app sees the rest of the path
        path = environ.get("PATH_INFO", "")
        if path != "/images" and not path.startswith("/images/"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"dynimg is mounted at /images/\n"]
        environ["SCRIPT_NAME"], environ["PATH_INFO"] = "/images", path[len("/images"):]
        return application(environ, start_response)

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *args):
            pass  # the app logs each request itself

    with make_server(args.host, args.port, mounted, handler_class=QuietHandler) as server:
        print(f"dynimg serving {config.image_root} at http://{args.host}:{args.port}/images/")
        server.serve_forever()
    return 0


def _command_render(args, config):
    params = {name: value for name, value in vars(args).items()
              if name in PARAMETERS and name != "name" and value not in (None, False)}
    params.update({"forcefit": "1"} if args.forcefit else {})
    params.update({"upscale": "1"} if args.upscale else {})
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/" + args.name,
               "QUERY_STRING": urllib.parse.urlencode(params)}
    try:
        spec = parse_spec(environ, config)
        source = open_source(spec, config)
        started = time.perf_counter()
        rendered = render(source.data, spec, config)
    except HTTPError as error:
        print(f"dynimg: {error.status}: {error.message}", file=sys.stderr)
        return 1
    elapsed = (time.perf_counter() - started) * 1000
    with open(args.output, "wb") as output:
        output.write(rendered.data)
    print(f"{spec.name}: {rendered.source_size[0]}x{rendered.source_size[1]} -> "
          f"{rendered.width}x{rendered.height} {rendered.format} q{rendered.quality}, "
          f"{len(rendered.data)} bytes, {elapsed:.0f} ms -> {args.output}")
    return 0


COMMANDS = {"serve": _command_serve, "check": _command_check, "render": _command_render,
            "cache": _command_cache, "sign": _command_sign}

if __name__ == "__main__":
    sys.exit(main())
