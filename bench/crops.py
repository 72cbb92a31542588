"""gravity=smart on the corpus photos: which region each strategy keeps at a few
aspects, whether it holds the photo's subject (a box found by looking), and what
the analysis costs, one core.

    nice -n 5 taskset -c 1 .venv/bin/python bench/crops.py [--montage docs/smart-crops.jpg]

Strategies, all on the same copy of the upright image, SMART_SIDE px on its longest
side: `centre` (gravity=center); `smart`, dynimg's own (the maximum of a blurred map
of edges, chroma and skin, weighted towards the centre); `entropy`, trimming a
step at a time the side whose slice has the lower histogram entropy; `attention`,
smart without the weight towards the centre. A cover crop leaves out one side's
overflow only, so each aspect here is a crop of the whole width or the whole height.
"""

import argparse
import io
import os
import statistics
import sys
import time

from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dynimg  # noqa: E402

CORPUS = os.environ.get("DYNIMG_CORPUS", os.path.join(os.path.dirname(__file__), "..", "..",
                                                      "shared", "corpus"))

#: Photos with a subject, and its box (left, top, right, bottom as fractions of the
#: upright photo), drawn by looking at each: the part a crop must not lose.
SUBJECTS = {
    "photo-large-3.jpg": ("dragonfly's head and body", (0.53, 0.33, 0.61, 0.45)),
    "photo-medium-2.jpg": ("ladybird", (0.65, 0.44, 0.75, 0.60)),
    "photo-medium-1.jpg": ("eyes, nose and mouth", (0.40, 0.26, 0.60, 0.49)),
    "photo-large-1.jpg": ("bird", (0.40, 0.35, 0.54, 0.66)),
    "progressive.jpg": ("the fig's flesh", (0.50, 0.38, 0.68, 0.72)),
    "photo-medium.png": ("both eyes", (0.16, 0.35, 0.85, 0.53)),
    "panorama.tif": ("the pyramid", (0.51, 0.45, 0.57, 0.65)),
}

#: Further photos whose regions are printed (no single subject to score).
OTHERS = ("photo-large-2.jpg", "photo-large-portrait.jpg", "photo-phone.jpg",
          "icc-adobergb.jpg", "webp-lossy.webp", "exif-orient-6.jpg")

#: Crop aspects (width / height): square, wide strips and tall strips.
ASPECTS = {"1:1": 1.0, "3:1": 3.0, "1:3": 1 / 3, "16:9": 16 / 9, "9:16": 9 / 16}

#: The montage for docs/: photos, aspects, and the height of a row.
MONTAGE = (("photo-medium-2.jpg", "photo-medium-1.jpg", "photo-large-3.jpg", "photo-large-1.jpg",
            "panorama.tif"),
           ("1:1", "1:3", "3:1"), 140)

ROUNDS = 7
ENTROPY_STEPS = 32


def upright(name, draft=None):
    """The photo decoded and upright, as the pipeline has it before resizing
    (a JPEG drafted to about `draft` px when given)."""
    with open(os.path.join(CORPUS, name), "rb") as file:
        image = Image.open(io.BytesIO(file.read()))
        if draft and image.format == "JPEG":
            image.draft("RGB", (draft, draft))
        image.load()
    facts = dynimg.facts_of(image)
    image = dynimg.ORIENTATIONS.get(facts.orientation) and image.transpose(
        dynimg.ORIENTATIONS[facts.orientation]) or image
    return image.convert("RGB"), facts.size


def shown_size(size, aspect):
    """The region a cover crop of this aspect shows: the whole width or height."""
    width, height = size
    return (height * aspect, height) if width / height > aspect else (width, width / aspect)


def analysis_copy(image, source):
    scale = dynimg.SMART_SIDE / max(source)
    return image.resize((max(1, round(source[0] * scale)), max(1, round(source[1] * scale))),
                        Image.Resampling.BOX)


def entropy_centre(image, source, shown):
    """The centre of the region an entropy trim keeps, as fractions."""
    copy = analysis_copy(image, source)
    box = [0, 0, copy.width, copy.height]
    for axis, length in ((0, shown[0] / source[0]), (1, shown[1] / source[1])):
        keep = max(1, round(length * copy.size[axis]))
        step = max(1, copy.size[axis] // ENTROPY_STEPS)
        while box[axis + 2] - box[axis] > keep:
            cut = min(step, box[axis + 2] - box[axis] - keep)
            first, last = list(box), list(box)
            first[axis + 2], last[axis] = box[axis] + cut, box[axis + 2] - cut
            if copy.crop(first).entropy() < copy.crop(last).entropy():
                box[axis] += cut
            else:
                box[axis + 2] -= cut
    return (box[0] + box[2]) / 2 / copy.width, (box[1] + box[3]) / 2 / copy.height


def attention_only(image, source, shown):
    """smart without its weight towards the centre."""
    centre = dynimg.SMART_CENTRE
    dynimg.SMART_CENTRE = Image.new("L", (1, 1), 255)
    try:
        return dynimg.smart_focus(image, source)
    finally:
        dynimg.SMART_CENTRE = centre


STRATEGIES = {
    "centre": lambda image, source, shown: (0.5, 0.5),
    "smart": lambda image, source, shown: dynimg.smart_focus(image, source),
    "entropy": entropy_centre,
    "attention": attention_only,
}


def region(strategy, image, source, aspect):
    shown = shown_size(source, aspect)
    point = STRATEGIES[strategy](image, source, shown)
    left, top, right, bottom = dynimg.region_around(point, source, shown)
    return (left / source[0], top / source[1], right / source[0], bottom / source[1])


def holds(box, subject):
    return (box[0] <= subject[0] + 1e-9 and box[1] <= subject[1] + 1e-9
            and box[2] >= subject[2] - 1e-9 and box[3] >= subject[3] - 1e-9)


def fits(aspect, source, subject):
    shown = shown_size(source, aspect)
    return (shown[0] / source[0] >= subject[2] - subject[0]
            and shown[1] / source[1] >= subject[3] - subject[1])


def median_ms(function, *args):
    times = []
    for _ in range(ROUNDS):
        started = time.process_time()
        function(*args)
        times.append((time.process_time() - started) * 1000)
    return statistics.median(times)


def score():
    """Per photo and aspect: whether each strategy's region holds the subject."""
    print("| photo (subject) | aspect | " + " | ".join(STRATEGIES) + " |")
    print("|---|---|" + "---|" * len(STRATEGIES))
    totals = dict.fromkeys(STRATEGIES, 0)
    counted = 0
    for name, (what, subject) in SUBJECTS.items():
        image, source = upright(name)
        for label, aspect in ASPECTS.items():
            if not fits(aspect, source, subject):
                continue
            counted += 1
            cells = []
            for strategy in STRATEGIES:
                box = region(strategy, image, source, aspect)
                totals[strategy] += holds(box, subject)
                cells.append(("kept " if holds(box, subject) else "lost ")
                             + f"{box[0]:.2f}-{box[2]:.2f}" if aspect < source[0] / source[1]
                             else ("kept " if holds(box, subject) else "lost ")
                             + f"{box[1]:.2f}-{box[3]:.2f}")
            print(f"| {name} ({what}) | {label} | " + " | ".join(cells) + " |")
    print(f"| **subject kept** | {counted} crops | "
          + " | ".join(f"**{totals[strategy]}**" for strategy in STRATEGIES) + " |")


def costs():
    """Per photo: ms of smart's analysis at the decoded size of a 640 px answer and at
    full size, entropy's, and how far smart's point moves when the decoded scale is a
    24 px answer's (why a smart placeholder is decoded at its answer's scale)."""
    print("\n| photo | decoded for 640 px | smart ms | entropy ms | full size | smart ms "
          "| point (640 px) | point (24 px) |")
    print("|---|---|---:|---:|---|---:|---|---|")
    drafted_ms = []
    for name in (*SUBJECTS, *OTHERS):
        drafted, source = upright(name, draft=640)
        full, _ = upright(name)
        tiny, _ = upright(name, draft=24)
        shown = shown_size(source, 1.0)
        smart_ms = median_ms(dynimg.smart_focus, drafted, source)
        entropy_ms = median_ms(entropy_centre, drafted, source, shown)
        full_ms = median_ms(dynimg.smart_focus, full, source)
        drafted_ms.append(smart_ms)
        point, tiny_point = dynimg.smart_focus(drafted, source), dynimg.smart_focus(tiny, source)
        print(f"| {name} | {drafted.width}x{drafted.height} | {smart_ms:.1f} | {entropy_ms:.1f} "
              f"| {full.width}x{full.height} | {full_ms:.1f} | {point[0]:.3f}, {point[1]:.3f} "
              f"| {tiny_point[0]:.3f}, {tiny_point[1]:.3f} |")
    print(f"smart at the 640 px answer's decoded size: median {statistics.median(drafted_ms):.1f}"
          f" ms, at most {max(drafted_ms):.1f} ms")


def montage(path):
    """centre and smart crops side by side, one photo a row, one aspect a pair."""
    names, labels, row_height = MONTAGE
    rows = []
    for name in names:
        image, source = upright(name, draft=1200)
        tiles = []
        for label in labels:
            for strategy in ("centre", "smart"):
                box = region(strategy, image, source, ASPECTS[label])
                crop = image.crop(tuple(round(side * whole) for side, whole in
                                        zip(box, image.size * 2)))
                crop.thumbnail((row_height * 3, row_height))
                tiles.append((f"{label} {strategy}", crop))
        rows.append(tiles)
    width = max(sum(tile.width + 12 for _, tile in tiles) for tiles in rows)
    sheet = Image.new("RGB", (width, len(rows) * (row_height + 22)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, tiles in enumerate(rows):
        left, top = 0, index * (row_height + 22)
        for caption, tile in tiles:
            draw.text((left + 2, top + 4), caption, fill="black")
            sheet.paste(tile, (left, top + 18))
            left += tile.width + 12
    sheet.save(path, quality=75, optimize=True, progressive=True)
    print(f"\n{path}: {sheet.width}x{sheet.height}, {os.path.getsize(path)} bytes")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--montage", help="also write centre vs smart crops to this JPEG")
    args = parser.parse_args()
    score()
    costs()
    if args.montage:
        montage(args.montage)


if __name__ == "__main__":
    main()
