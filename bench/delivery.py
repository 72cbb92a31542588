"""What each client receives, as a person sees it: per network class and client,
on photos the settings were not chosen on (bench/formats.py tunes on others).

    .venv/bin/python bench/delivery.py        (scores come from .venv-bench)

For each held-out photo at 360, 800 and 1600 CSS px (dpr 1), each class and each
client (JPEG only, WebP, AVIF: format=auto with that client's Accept), dynimg's
answer is rendered, scaled to the layout width as the browser would (LANCZOS) and
scored with SSIMULACRA2 against a LANCZOS resize of the full decode (90 excellent,
70 good, 50 fair, 30 poor). Next to it:

- before: what dynimg sent before AVIF and the joint width/quality choice (the
  BASELINE revision's dynimg.py and dynimg.ini, from git, rendering the same way);
- best: for the budgeted classes at 800 px, the best the bytes dynimg sent can buy
  in the client's format: every width on a ladder at the highest quality that fits,
  each scored the same way; "SSIM picks" is what a chooser picking the highest
  luma SSIM (8x8 windows) among those would have scored.

Medians over the photos. Encode ms is the encode step's wall time within the
render (one thread); encodes counts the encoder calls of an answer.
"""

import argparse
import configparser
import hashlib
import importlib.util
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from PIL import Image, ImageOps

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dynimg  # noqa: E402
from measure import PROJECT, Scorer, corpus_dir, ssim  # noqa: E402

HELD_OUT = ("photo-large-2.jpg", "photo-large-portrait.jpg", "photo-phone.jpg",
            "icc-adobergb.jpg")
WIDTHS = (360, 800, 1600)
CLASSES = ("slow-2g", "2g", "3g", "4g", "default")
CLIENTS = {
    "JPEG only": "image/png,image/svg+xml,image/*;q=0.8,*/*;q=0.5",
    "WebP": "image/webp,image/apng,image/*,*/*;q=0.8",
    "AVIF": "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8",
}
#: dynimg before AVIF and before budgets chose width and quality together.
BASELINE = "fb743ca"
#: Widths, as fractions of the layout width, the "best" search tries.
LADDER = (1.0, 0.85, 0.72, 0.6, 0.5, 0.42, 0.35, 0.3, 0.25)


def baseline():
    """The BASELINE dynimg module and its config (its own dynimg.ini and profiles)."""
    folder = tempfile.mkdtemp(prefix="dynimg-baseline-")
    for name in ("dynimg.py", "dynimg.ini"):
        with open(os.path.join(folder, name), "wb") as file:
            file.write(subprocess.run(["git", "show", f"{BASELINE}:{name}"], cwd=PROJECT,
                                      check=True, capture_output=True).stdout)
    ini = configparser.ConfigParser(interpolation=None)
    ini.read(os.path.join(folder, "dynimg.ini"))
    ini["server"].update(image_root=f"{PROJECT}/samples",
                         not_found_image=f"{PROJECT}/404image.png",
                         error_image=f"{PROJECT}/errorimage.png")
    ini["cache"]["cache_dir"] = ""
    with open(os.path.join(folder, "dynimg.ini"), "w", encoding="utf-8") as file:
        ini.write(file)
    spec = importlib.util.spec_from_file_location("dynimg_before",
                                                  os.path.join(folder, "dynimg.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, module.load_config(os.path.join(folder, "dynimg.ini"))


def full_decode(path):
    image = ImageOps.exif_transpose(Image.open(path))
    icc = image.info.get("icc_profile")
    image = image.convert("RGB")
    if icc:
        from PIL import ImageCms
        image = ImageCms.profileToProfile(image, ImageCms.ImageCmsProfile(io.BytesIO(icc)),
                                          ImageCms.createProfile("sRGB"), outputMode="RGB")
    return image


class Counted:
    """Counts a module's encoder calls (its _save)."""

    def __init__(self, module):
        self.module, self.calls, self.save = module, 0, module._save
        module._save = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.save(*args, **kwargs)


def answer(module, config, data, width, network, accept, counter):
    query = f"width={width}&format=auto" + (f"&bandwidth={network}" if network != "default"
                                             else "")
    request = module.Request(path="/photo.jpg", query=query, headers={"Accept": accept})
    spec = module.parse_spec(request, config)
    counter.calls = 0
    rendered = module.render(data, spec, config)
    encode_ms = dict(rendered.timings)["encode"] * 1000
    return rendered.data, rendered.width, encode_ms, counter.calls


def seen(data, reference):
    """The answer as the browser shows it: decoded and scaled to the layout size."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    if image.size != reference.size:
        image = image.resize(reference.size, Image.Resampling.LANCZOS)
    return image


def best_in(reference, image_format, budget):
    """(width, bytes) at every ladder width: the highest quality that fits the budget."""
    found = []
    for fraction in LADDER:
        size = (max(1, round(reference.width * fraction)),
                max(1, round(reference.height * fraction)))
        smaller = reference.resize(size, Image.Resampling.LANCZOS)
        low, high, fitting = 1, 100, None
        while low <= high:
            quality = (low + high) // 2
            data = save(smaller, image_format, quality)
            if len(data) <= budget:
                fitting, low = data, quality + 1
            else:
                high = quality - 1
        if fitting:
            found.append((size[0], fitting))
    return found


def save(image, image_format, quality):
    image.info = {}  # no source metadata (the AVIF plugin would write it)
    buffer = io.BytesIO()
    if image_format == "avif":
        codec, speed = dynimg.AVIF_ENCODER
        image.save(buffer, "AVIF", quality=quality, codec=codec, speed=speed, max_threads=1)
    elif image_format == "webp":
        image.save(buffer, "WEBP", quality=quality, method=dynimg.WEBP_METHOD)
    else:
        image.save(buffer, "JPEG", quality=quality, optimize=True, progressive=True)
    return buffer.getvalue()


def main():
    arguments = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    arguments.add_argument("--widths", type=int, nargs="+", default=WIDTHS)
    arguments.add_argument("--json", help="also write every row to this file")
    options = arguments.parse_args()
    if not dynimg.AVIF_ENCODER:
        sys.exit("the AVIF plugin is not installed (make with AVIF=yes)")
    before, before_config = baseline()
    config = dynimg.load_config()
    dynimg.limit_pillow()
    counters = {dynimg: Counted(dynimg), before: Counted(before)}
    scorer = Scorer()
    rows = {}  # (width, class, client) -> list of per-photo dicts
    pairs, slots = [], []  # scoring work: (reference, candidate) and where the score goes
    started = time.perf_counter()
    for name in HELD_OUT:
        path = os.path.join(corpus_dir(), name)
        with open(path, "rb") as file:
            data = file.read()
        full = full_decode(path)
        for width in options.widths:
            reference = full.resize((width, round(full.height * width / full.width)),
                                    Image.Resampling.LANCZOS)
            for network in CLASSES:
                for client, accept in CLIENTS.items():
                    row = {}
                    for label, module, module_config in (("now", dynimg, config),
                                                         ("before", before, before_config)):
                        body, sent, encode_ms, encodes = answer(
                            module, module_config, data, width, network, accept,
                            counters[module])
                        row[label] = {"bytes": len(body), "width": sent, "ms": encode_ms,
                                      "encodes": encodes,
                                      "format": Image.open(io.BytesIO(body)).format}
                        pairs.append((reference, seen(body, reference)))
                        slots.append((row[label], "score"))
                    if width == 800 and network in ("slow-2g", "2g", "3g"):
                        image_format = row["now"]["format"].lower()
                        candidates = best_in(reference, image_format, row["now"]["bytes"])
                        row["candidates"] = [{"width": sent} for sent, _ in candidates]
                        for candidate, (_, body) in zip(row["candidates"], candidates):
                            shown = seen(body, reference)
                            candidate["ssim"] = ssim(reference, shown)
                            pairs.append((reference, shown))
                            slots.append((candidate, "score"))
                    row["photo"] = name
                    rows.setdefault((width, network, client), []).append(row)
        print(f"  rendered {name} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    scores = {}
    unique = []
    for reference, candidate in pairs:  # identical answers are scored once
        digest = hashlib.sha1(reference.tobytes() + candidate.tobytes()).digest()
        if digest not in scores:
            scores[digest] = len(unique)
            unique.append((reference, candidate))
    results = scorer.score(unique)
    scorer.close()
    for (reference, candidate), (target, key) in zip(pairs, slots):
        digest = hashlib.sha1(reference.tobytes() + candidate.tobytes()).digest()
        target[key] = results[scores[digest]]
    if options.json:
        with open(options.json, "w", encoding="utf-8") as file:
            json.dump([{"css_px": width, "class": network, "client": client, **row}
                       for (width, network, client), values in rows.items() for row in values],
                      file, indent=1)
    report(rows, options.widths)


def median(values):
    values = [value for value in values if value is not None]
    return statistics.median(values) if values else float("nan")


def report(rows, widths):
    print(f"held-out photos: {', '.join(HELD_OUT)}; dpr 1; medians\n")
    print("| CSS px | class | client | sends | bytes | sent width | SSIMULACRA2 | encode ms "
          "| encodes | before: bytes | before: score | best in the bytes | SSIM picks |")
    print("|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (width, network, client), values in rows.items():
        now = [value["now"] for value in values]
        old = [value["before"] for value in values]
        best = picks = float("nan")
        if all("candidates" in value for value in values):
            best = median(max(c["score"] for c in value["candidates"]) if value["candidates"]
                          else None for value in values)
            picks = median(max(value["candidates"], key=lambda c: c["ssim"])["score"]
                           if value["candidates"] else None for value in values)
        sends = "/".join(sorted({value["format"] for value in now}))
        print(f"| {width} | {network} | {client} | {sends} | "
              f"{median(v['bytes'] for v in now):,.0f} | {median(v['width'] for v in now):.0f} | "
              f"{median(v['score'] for v in now):.1f} | {median(v['ms'] for v in now):.0f} | "
              f"{median(v['encodes'] for v in now):.0f} | "
              f"{median(v['bytes'] for v in old):,.0f} | {median(v['score'] for v in old):.1f} | "
              f"{best:.1f} | {picks:.1f} |")
    # the targets: 800 CSS px, held-out photos
    if 800 not in widths:
        return
    print("\nat 800 CSS px:")
    for network, client in (("2g", "AVIF"), ("slow-2g", "AVIF"), ("2g", "JPEG only"),
                            ("2g", "WebP"), ("slow-2g", "WebP"), ("slow-2g", "JPEG only")):
        values = rows[(800, network, client)]
        regret = statistics.mean(max(c["score"] for c in v["candidates"]) - v["now"]["score"]
                                 for v in values if v["candidates"])
        print(f"- {client} client on {network}: SSIMULACRA2 "
              f"{median(v['now']['score'] for v in values):.1f} (before "
              f"{median(v['before']['score'] for v in values):.1f}); best in the same bytes "
              f"{regret:.1f} points higher on average")
    for width in widths:
        now = rows[(width, "default", "AVIF")]
        before_jpeg = rows[(width, "default", "JPEG only")]
        ratio = median(a["now"]["bytes"] / b["before"]["bytes"] for a, b in zip(now, before_jpeg))
        change = median(a["now"]["score"] - b["before"]["score"] for a, b in zip(now, before_jpeg))
        print(f"- no budget, {width} CSS px: an AVIF client gets {ratio:.2f}x the bytes of the "
              f"JPEG sent before, at {change:+.1f} SSIMULACRA2")


if __name__ == "__main__":
    main()
