"""Animated WebP answers, measured: bytes and CPU by encoder setting, the cost of
a frame (for max_frames and max_animation_pixels) and the memory of a render.

    nice -n 5 .venv/bin/python bench/animation.py

Sources: the corpus's anim.gif (44 frames, 400x400), and two made here from corpus
photos: `pan.gif`, a 480x320 window gliding over a photo (40 frames, photographic,
a palette per frame), and `shapes.gif`, flat shapes moving on a flat background
(60 frames, 480x360, transparent background). Each is rendered by dynimg.render
(format=webp) at its own width and at 240 px; CPU is process time, one render.
`--slow` adds method 6 to the settings compared; `--memory` measures memory only.
"""

import io
import os
import subprocess
import sys
import tempfile
import time

from PIL import Image, ImageDraw

PROJECT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, PROJECT)
sys.path.insert(0, os.path.join(PROJECT, "tests"))

import dynimg  # noqa: E402
from conftest import corpus_dir, write_config  # noqa: E402

#: Encoder settings compared: (method, minimize_size).
SETTINGS = ((0, False), (2, False), (4, False), (4, True))

#: With --slow, method 6 too (10-25 times the CPU of method 4).
SLOW_SETTINGS = ((6, False),)


def gif_bytes(frames, duration, **options):
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=duration,
                   loop=0, **options)
    return buffer.getvalue()


def pan_gif():
    photo = Image.open(os.path.join(corpus_dir(), "photo-medium-2.jpg")).convert("RGB")
    photo = photo.resize((960, 600), Image.Resampling.LANCZOS)
    return gif_bytes([photo.crop((x, 140, x + 480, 460)) for x in range(0, 480, 12)], 80)


def shapes_gif():
    frames = []
    for step in range(60):
        frame = Image.new("RGBA", (480, 360), (0, 0, 0, 0))
        draw = ImageDraw.Draw(frame)
        draw.rectangle((20 + step * 6, 40, 120 + step * 6, 140), fill="#d33")
        draw.ellipse((200, 60 + step * 4, 300, 160 + step * 4), fill="#36c")
        draw.text((10, 330), f"frame {step}", fill="black")
        frames.append(frame)
    return gif_bytes(frames, 50, disposal=2)


def tiny_frames_gif(count):
    frames = [Image.new("RGB", (16, 16), (step % 256, 0, 0)) for step in range(count)]
    return gif_bytes(frames, 20)


def render(config, data, width, setting=(dynimg.WEBP_ANIMATION_METHOD,
                                          dynimg.WEBP_ANIMATION_MINIMIZE)):
    dynimg.WEBP_ANIMATION_METHOD, dynimg.WEBP_ANIMATION_MINIMIZE = setting
    query = "format=webp&bandwidth=wifi" + (f"&width={width}" if width else "")
    spec = dynimg.parse_spec(dynimg.Request(path="/x.gif", query=query), config)
    started = time.process_time()
    rendered = dynimg.render(data, spec, config)
    assert rendered.frames.isdigit(), rendered.frames
    return rendered, time.process_time() - started


def settings_table(config, sources, settings):
    print("\n| source | width | method | minimize_size | KiB | CPU s |"
          "\n|---|---:|---:|---|---:|---:|")
    for name, data in sources.items():
        for width in (None, 240):
            for setting in settings:
                rendered, seconds = render(config, data, width, setting)
                print(f"| {name} | {rendered.width} | {setting[0]} | {setting[1]} | "
                      f"{len(rendered.data) / 1024:.0f} | {seconds:.2f} |")


def cost_table(config, sources):
    print("\n| source | frames | width | Mpx decoded | CPU s | ms per Mpx | ms per frame |"
          "\n|---|---:|---:|---:|---:|---:|---:|")
    for name, data in sources.items():
        image = Image.open(io.BytesIO(data))
        frames = dynimg.facts_of(image, data).frames
        for width in (None, 240):
            rendered, seconds = render(config, data, width)
            pixels = frames * image.width * image.height / 1e6
            print(f"| {name} | {frames} | {rendered.width} | {pixels:.1f} | {seconds:.2f} | "
                  f"{seconds * 1000 / pixels:.0f} | {seconds * 1000 / frames:.1f} |")


def peak_rss_mb(path, query):
    """How far a render of `path` raises the RSS of a fresh process above what it
    held once loaded, with no limit on its memory or time (the peak reset through /proc/self/clear_refs; VmHWM, unlike
    ru_maxrss, is not carried over from the parent that started it)."""
    code = (f"import sys; sys.path[:0] = [{PROJECT!r}, {os.path.join(PROJECT, 'tests')!r}]\n"
            "import dynimg, tempfile; from conftest import write_config\n"
            "def status(key):\n"
            "    return int(next(line.split()[1] for line in open('/proc/self/status')"
            " if line.startswith(key)))\n"
            f"config = dynimg.load_config(write_config(tempfile.mkdtemp(), {corpus_dir()!r}, "
            "limits={'max_animation_pixels': '1000000000', 'max_render_mb': '4000', "
            "'max_render_seconds': '600'}))\n"
            f"spec = dynimg.parse_spec(dynimg.Request(path='/x', query={query!r}), config)\n"
            f"data = open({path!r}, 'rb').read()\n"
            "open('/proc/self/clear_refs', 'w').write('5')\n"
            "before = status('VmRSS')\n"
            "rendered = dynimg.render(data, spec, config)\n"
            "print(before, status('VmHWM'), rendered.frames)\n")
    before, after, frames = subprocess.run([sys.executable, "-c", code], check=True,
                                           capture_output=True, text=True).stdout.split()
    return (int(after) - int(before)) / 1024, frames


def memory_table(folder):
    print("\n| source | query | frames | peak RSS over the loaded process, MB |"
          "\n|---|---|---|---:|")
    photo = Image.open(os.path.join(corpus_dir(), "photo-medium-2.jpg")).convert("RGB")
    cases = {"photo-2000.webp": (photo.resize((2000, 1250)), 12),
             "photo-4000.webp": (photo.resize((4000, 2500)), 2)}
    for name, (frame, count) in cases.items():
        frames = [frame.rotate(step * 0.5) for step in range(count)]
        path = os.path.join(folder, name)
        frames[0].save(path, "WEBP", save_all=True, append_images=frames[1:], duration=100,
                       quality=80)
        for query in ("format=jpeg&bandwidth=wifi", "format=webp&bandwidth=wifi",
                      "format=webp&bandwidth=wifi&width=800"):
            growth, kind = peak_rss_mb(path, query)
            print(f"| {name} ({frame.width}x{frame.height}, {count} frames) | {query} | {kind} "
                  f"| {growth:.0f} |")
    path = os.path.join(corpus_dir(), "anim.gif")
    for query in ("format=jpeg&bandwidth=wifi", "format=webp&bandwidth=wifi"):
        growth, kind = peak_rss_mb(path, query)
        print(f"| anim.gif | {query} | {kind} | {growth:.0f} |")


def main():
    folder = tempfile.mkdtemp(prefix="dynimg-bench-")
    config = dynimg.load_config(write_config(folder, corpus_dir(), limits={
        "max_frames": "10000", "max_animation_pixels": "1000000000",
        "max_render_seconds": "600"}))
    with open(os.path.join(corpus_dir(), "anim.gif"), "rb") as file:
        sources = {"anim.gif": file.read(), "pan.gif": pan_gif(), "shapes.gif": shapes_gif()}
    if "--memory" not in sys.argv:
        settings_table(config, sources,
                       SETTINGS + (SLOW_SETTINGS if "--slow" in sys.argv else ()))
        cost_table(config, dict(sources, **{"tiny-1000.gif": tiny_frames_gif(1000)}))
    memory_table(folder)
    print(f"\nPillow {Image.__version__}")


if __name__ == "__main__":
    main()
