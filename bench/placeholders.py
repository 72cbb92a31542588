"""What a placeholder costs: its bytes in WebP and JPEG, and the CPU time to make
it beside the 640 px answer it stands in for, on the corpus photos, one core.

    taskset -c 1 .venv/bin/python bench/placeholders.py
"""

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dynimg  # noqa: E402

CORPUS = os.environ.get("DYNIMG_CORPUS", os.path.join(os.path.dirname(__file__), "..", "..",
                                                      "shared", "corpus"))
PHOTOS = ("photo-large-1.jpg", "photo-large-2.jpg", "photo-large-3.jpg",
          "photo-large-portrait.jpg", "photo-medium-1.jpg", "photo-medium-2.jpg",
          "photo-medium.png", "photo-phone.jpg", "progressive.jpg", "icc-adobergb.jpg")
ROUNDS = 5


def cpu_ms(data, spec, config):
    """Median CPU ms of rendering spec from data, and the bytes it made."""
    times = []
    for _ in range(ROUNDS):
        started = time.process_time()
        rendered = dynimg.render(data, spec, config)
        times.append((time.process_time() - started) * 1000)
    return statistics.median(times), len(rendered.data)


def main():
    config = dynimg.load_config()
    print("| photo | WebP bytes | JPEG bytes | placeholder ms | 640 px answer ms | ratio |")
    print("|---|---:|---:|---:|---:|---:|")
    rows = []
    for name in PHOTOS:
        with open(os.path.join(CORPUS, name), "rb") as file:
            data = file.read()

        def spec(query):
            return dynimg.parse_spec(dynimg.Request(path="/" + name, query=query), config)

        placeholder_ms, webp = cpu_ms(data, spec("width=640&placeholder=1&format=webp"), config)
        _, jpeg = cpu_ms(data, spec("width=640&placeholder=1&format=jpeg"), config)
        answer_ms, _ = cpu_ms(data, spec("width=640"), config)
        rows.append((webp, jpeg, placeholder_ms, answer_ms))
        print(f"| {name} | {webp} | {jpeg} | {placeholder_ms:.0f} | {answer_ms:.0f} | "
              f"{placeholder_ms / answer_ms:.2f} |")
    columns = list(zip(*rows))
    print(f"| **median** | {statistics.median(columns[0]):.0f} | "
          f"{statistics.median(columns[1]):.0f} | {statistics.median(columns[2]):.0f} | "
          f"{statistics.median(columns[3]):.0f} | "
          f"{statistics.median(p / a for _, _, p, a in rows):.2f} |")
    print(f"WebP {min(columns[0])}-{max(columns[0])} bytes, "
          f"JPEG {min(columns[1])}-{max(columns[1])} bytes")


if __name__ == "__main__":
    main()
