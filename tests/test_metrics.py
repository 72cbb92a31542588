"""Metrics: each process's counts in its own file, summed by /_metrics (Prometheus
text), /_health and `dynimg.py stats`; checked with prometheus_client's parser, on
functions, on the app, and on a real mod_wsgi-express with two daemon processes
killed, restarted gracefully and restarted whole."""

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

import dynimg
from conftest import PROJECT, App, ModWsgiExpress, shared_tempdir, write_config

LOCAL = {"REMOTE_ADDR": "127.0.0.1"}


def parse(text):
    """{(sample name, sorted label items): value} of a Prometheus text page."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def write_process_file(folder, server, process, counts):
    """A process's file as Metrics writes it; `process` is PID-STARTTIME-TOKEN."""
    name = f"{server}.{process}.json"
    dynimg._write_json(os.path.join(folder, name),
                       {"counts": [[metric, list(labels), amount]
                                   for (metric, labels), amount in counts.items()]})
    return name


# --- the text format ----------------------------------------------------------


def test_exposition_passes_the_prometheus_parser_with_cumulative_buckets():
    metrics = dynimg.Metrics("")
    for seconds in (0.004, 0.03, 0.03, 0.7, 42.0):
        metrics.count_render(seconds)
    metrics.count_hit()
    samples = parse(dynimg.exposition(metrics.totals()))
    buckets = {dict(labels)["le"]: value for (name, labels), value in samples.items()
               if name == "dynimg_render_seconds_bucket"}
    assert buckets["0.01"] == 1 and buckets["0.025"] == 1 and buckets["0.05"] == 3
    assert buckets["0.5"] == 3 and buckets["1.0"] == 4 and buckets["10.0"] == 4
    assert buckets["+Inf"] == 5 == samples["dynimg_render_seconds_count", ()]
    assert samples["dynimg_render_seconds_sum", ()] == pytest.approx(42.764)
    assert samples["dynimg_cache_hits_total", ()] == 1
    assert samples["dynimg_processes", ()] == 1


def test_a_zombie_is_no_running_process():
    process = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 10
        while b") Z " not in open(f"/proc/{process.pid}/stat", "rb").read():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert dynimg.process_tag(process.pid) is None  # exited, not yet reaped
    finally:
        process.wait()
    assert dynimg.process_tag(os.getpid()).startswith(f"{os.getpid()}-")


def test_every_family_has_help_and_type_and_counters_end_in_total():
    text = dynimg.exposition(collections.Counter())
    families = {family.name: family for family in text_string_to_metric_families(text)}
    for name, (kind, _, _) in dynimg.METRICS.items():
        assert f"# HELP {name} " in text and f"# TYPE {name} {kind}\n" in text
        assert name.endswith("_total") == (kind == "counter")
        # the parser names a counter's family without its _total
        assert families[name.removesuffix("_total")].type == kind


def test_label_values_are_escaped():
    awkward = 'say "hi"\\no\nway\\'  # a backslash before n, a newline, one at the end
    counts = collections.Counter({("dynimg_requests_total", ("200", awkward)): 3})
    samples = parse(dynimg.exposition(counts))
    assert samples["dynimg_requests_total", (("class", awkward), ("status", "200"))] == 3


# --- what one request counts ----------------------------------------------------


def counted(status, source_bytes, sent, media="image/jpeg", network="3g"):
    metrics = dynimg.Metrics("")
    metrics.count_answer(dynimg.Response(status, (), source_bytes=source_bytes), network,
                         media, sent)
    return {key: value for key, value in metrics.totals().items()
            if key[0] != "dynimg_processes"}


def test_an_image_counts_its_bytes_and_what_its_source_would_have_cost():
    assert counted(200, 50000, 8000) == {
        ("dynimg_requests_total", ("200", "3g")): 1,
        ("dynimg_sent_bytes_total", ("3g", "jpeg")): 8000,
        ("dynimg_source_bytes_total", ("3g",)): 50000,
        ("dynimg_saved_bytes_total", ("3g",)): 42000}


def test_head_and_304_send_nothing_and_save_nothing():
    assert counted(304, 50000, 0) == {("dynimg_requests_total", ("304", "3g")): 1}


def test_an_answer_larger_than_its_source_saves_nothing():
    assert counted(200, 5000, 8000, "image/png")[("dynimg_saved_bytes_total", ("3g",))] == 0


def test_pages_and_errors_count_by_media_type_without_a_source():
    assert counted(400, None, 41, "text/plain; charset=utf-8", None) == {
        ("dynimg_requests_total", ("400", "none")): 1,
        ("dynimg_sent_bytes_total", ("none", "text")): 41}
    assert counted(404, None, 900, "application/x-unheard-of")[
        ("dynimg_sent_bytes_total", ("3g", "other"))] == 900


# --- the run folder -------------------------------------------------------------


@pytest.fixture
def run_dir(tmp_path):
    return str(tmp_path / "run")


def test_a_process_writes_its_file_at_start_and_within_a_second_of_a_count(run_dir):
    metrics = dynimg.Metrics(run_dir)
    path = os.path.join(run_dir, metrics.name)
    assert dynimg._read_counts(path)[1] == {"counts": []}
    metrics.count_hit()
    deadline = time.monotonic() + 10
    while not dynimg._read_counts(path)[0]:
        assert time.monotonic() < deadline, "the timer never wrote the file"
        time.sleep(0.05)
    reader = dynimg.Metrics(run_dir)  # another app, as another process would
    assert reader.totals()["dynimg_cache_hits_total", ()] == 1


def test_exited_processes_fold_into_the_retired_total_and_their_files_go(run_dir, monkeypatch):
    live = dynimg.Metrics(run_dir)
    live.count_hit()
    live.flush()
    server = live.server
    dead = write_process_file(run_dir, server, f"{dead_pid()}-1-a",
                              collections.Counter({("dynimg_cache_hits_total", ()): 5}))
    before = dynimg.sum_metrics(run_dir, server)
    assert before["dynimg_cache_hits_total", ()] == 6 and before["dynimg_processes", ()] == 2
    dynimg.fold_metrics(run_dir, server)
    after = dynimg.sum_metrics(run_dir, server)
    assert after["dynimg_cache_hits_total", ()] == 6
    assert after["dynimg_process_exits_total", ()] == 1 and after["dynimg_processes", ()] == 1
    assert os.path.exists(os.path.join(run_dir, dead))  # kept for sums already under way
    monkeypatch.setattr(dynimg, "FOLD_GRACE_SECONDS", -1)
    dynimg.fold_metrics(run_dir, server)
    assert not os.path.exists(os.path.join(run_dir, dead))
    assert dynimg.sum_metrics(run_dir, server)["dynimg_cache_hits_total", ()] == 6


def test_a_fold_between_reading_the_total_and_listing_counts_each_file_once(run_dir,
                                                                             monkeypatch):
    server = dynimg.process_tag(os.getppid())
    write_process_file(run_dir, server, f"{dead_pid()}-1-a",
                       collections.Counter({("dynimg_cache_hits_total", ()): 5}))
    listing = dynimg._metrics_files

    def fold_first(folder):
        dynimg.fold_metrics(folder, server)
        return listing(folder)

    monkeypatch.setattr(dynimg, "_metrics_files", fold_first)
    assert dynimg.sum_metrics(run_dir, server)["dynimg_cache_hits_total", ()] == 5
    assert dynimg.sum_metrics(run_dir, server)["dynimg_cache_hits_total", ()] == 5


def test_files_of_a_stopped_server_are_removed_and_strangers_left(run_dir):
    stopped = f"{dead_pid()}-1"
    old = write_process_file(run_dir, stopped, f"{dead_pid()}-1-a",
                             collections.Counter({("dynimg_cache_hits_total", ()): 7}))
    dynimg._write_json(os.path.join(run_dir, f"{stopped}.retired.json"), {"counts": []})
    stranger = os.path.join(run_dir, "notes.json")
    dynimg._write_json(stranger, {})
    metrics = dynimg.Metrics(run_dir)
    assert metrics.totals()["dynimg_cache_hits_total", ()] == 0
    assert sorted(os.listdir(run_dir)) == sorted([".fold.lock", metrics.name, "notes.json"])
    assert old not in os.listdir(run_dir)


def test_a_damaged_file_counts_as_empty(run_dir):
    metrics = dynimg.Metrics(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, f"{metrics.server}.1-1-ff.json"), "w") as file:
        file.write('{"counts": [["dynimg_cache_hits_total", [], 3], ["broken"')
    metrics.count_hit()
    assert metrics.totals()["dynimg_cache_hits_total", ()] == 1


def test_sums_read_at_most_the_cap_of_files(run_dir, monkeypatch):
    monkeypatch.setattr(dynimg, "MAX_METRICS_FILES", 3)
    server = dynimg.process_tag(os.getppid())
    for number in range(5):  # running processes all: this one's tag, five tokens
        write_process_file(run_dir, server, f"{dynimg.process_tag(os.getpid())}-{number}a",
                           collections.Counter({("dynimg_cache_hits_total", ()): 1}))
    counts = dynimg.sum_metrics(run_dir, server)
    assert counts["dynimg_cache_hits_total", ()] == 3 and counts["dynimg_processes", ()] == 3


def test_an_unwritable_run_dir_still_serves_and_counts_in_memory(image_root, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    config = dynimg.load_config(write_config(str(tmp_path), image_root,
                                             metrics={"run_dir": str(blocker / "run")}))
    app = App(config)
    assert app.request("/photo-medium-1.jpg", "width=40").status == 200
    app.dynimg.metrics.flush()  # logs once, raises nothing
    assert app.request("/_metrics", environ=LOCAL).status == 200


# --- who may read it --------------------------------------------------------------


@pytest.mark.parametrize("address, headers, allowed", [
    ("127.0.0.1", {}, True),
    ("127.8.9.10", {}, True),
    ("::1", {}, True),
    ("::ffff:127.0.0.1", {}, True),
    ("10.0.0.1", {}, False),
    ("2001:db8::1", {}, False),
    ("", {}, False),
    ("localhost", {}, False),
    ("127.0.0.1", {"X-Forwarded-For": "203.0.113.9"}, False),
    ("127.0.0.1", {"Forwarded": "for=203.0.113.9"}, False),
])
def test_only_allowed_networks_read_metrics_and_never_through_a_proxy(config, address,
                                                                      headers, allowed):
    request = dynimg.Request(path="/_metrics", headers=headers, remote_addr=address)
    assert dynimg.may_read_metrics(request, config) is allowed


def test_metrics_page_is_prometheus_text_or_a_403(app):
    app.request("/photo-medium-1.jpg", "width=40&bandwidth=2g")
    reply = app.request("/_metrics", environ=LOCAL)
    assert reply.status == 200 and reply.headers["Content-Type"] == dynimg.METRICS_TYPE
    assert reply.headers["Cache-Control"] == "no-store"
    assert parse(reply.text)["dynimg_requests_total", (("class", "2g"), ("status", "200"))] == 1
    refused = app.request("/_metrics", environ={"REMOTE_ADDR": "192.0.2.7"})
    assert refused.status == 403 and "allowed_networks" in refused.text


@pytest.mark.parametrize("kind", ["varnish", "nginx"])
def test_metrics_through_the_shipped_fronts_are_refused(kind, image_root):
    from test_cache_tier import Tier
    tier = Tier(kind, image_root)
    try:
        assert tier.get("/images/_metrics").status == 403  # every client looks local there
        backend = tier.backends.servers[0]
        assert backend.get("/images/_metrics").status == 200  # scraped on the host itself
    finally:
        tier.close()


@pytest.mark.parametrize("value", ["everyone", "10.0.0.0/33", "::1/129 x"])
def test_bad_allowed_networks_stop_start_up_naming_the_key(image_root, tmp_path, value):
    path = write_config(str(tmp_path), image_root, metrics={"allowed_networks": value})
    with pytest.raises(dynimg.ConfigError, match=r"\[metrics\] allowed_networks"):
        dynimg.load_config(path)


def test_empty_allowed_networks_lets_nobody_read(image_root, tmp_path):
    config = dynimg.load_config(write_config(str(tmp_path), image_root,
                                             metrics={"allowed_networks": ""}))
    assert App(config).request("/_metrics", environ=LOCAL).status == 403


# --- a real server with two daemon processes ----------------------------------------


#: The request mix: (path and query, class it is counted under, extra headers, method).
MIX = [("photo-medium-1.jpg?width=200", "default", {}, "GET")] * 3 + [
    ("photo-medium-1.jpg?width=200&bandwidth=2g&format=webp", "2g", {}, "GET"),
    ("photo-medium-1.jpg?width=200&bandwidth=2g&format=webp", "2g", {}, "GET"),
    ("photo-large-2.jpg?width=300&bandwidth=3g", "3g", {}, "GET"),
    ("photo-large-2.jpg?width=300&bandwidth=3g", "3g", {}, "GET"),
    ("photo-large-2.jpg?width=300&bandwidth=wifi&format=png", "wifi", {}, "GET"),
    ("png-alpha.png?width=600&upscale=1&format=png&bandwidth=wifi", "wifi", {}, "GET"),
    ("photo-medium-1.jpg?width=200", "default", {}, "HEAD"),
    ("nothing-here.jpg?width=120&bandwidth=3g", "3g", {}, "GET"),
    ("nothing-here.jpg?width=120&bandwidth=3g", "3g", {}, "GET"),
    ("photo-medium-1.jpg?width=x", "none", {}, "GET"),
    ("photo-medium-1.jpg?bandwidth=5g", "none", {}, "GET"),
]


def send_mix(server, image_root, expected):
    """Send MIX, then two revalidations of its first image (304s), adding what each
    answer should count to `expected`."""
    for path, network, headers, method in MIX:
        reply = server.get("/images/" + path, method=method, headers=headers)
        expect(expected, reply, network, method, image_root, path)
    head = server.get("/images/" + MIX[0][0], method="HEAD")
    expect(expected, head, "default", "HEAD", image_root, MIX[0][0])
    etag = head.headers["ETag"]
    for _ in range(2):
        reply = server.get("/images/" + MIX[0][0], headers={"If-None-Match": etag})
        assert reply.status == 304
        expect(expected, reply, "default", "GET", image_root, MIX[0][0])


def expect(expected, reply, network, method, image_root, path):
    expected["dynimg_requests_total", (("class", network), ("status", str(reply.status)))] += 1
    hit = reply.headers.get("Server-Timing") == dynimg.CACHE_HIT_TIMING
    if reply.status == 200:
        expected["dynimg_cache_hits_total", ()] += hit
        expected["dynimg_render_seconds_count", ()] += not hit
    if method == "HEAD" or reply.status == 304:
        return
    media = reply.headers["Content-Type"]
    expected["dynimg_sent_bytes_total", (("class", network),
                                         ("format", dynimg.SENT_FORMATS[media]))] += len(reply.body)
    if reply.status == 200:
        size = os.path.getsize(os.path.join(image_root, path.split("?")[0]))
        expected["dynimg_source_bytes_total", (("class", network),)] += size
        expected["dynimg_saved_bytes_total", (("class", network),)] += max(0, size
                                                                            - len(reply.body))


def image_figures(samples):
    """The samples that image requests make (pages and scrapes left out: their own
    counts change with every look)."""
    return {key: value for key, value in samples.items()
            if key[0] in ("dynimg_requests_total", "dynimg_sent_bytes_total",
                          "dynimg_source_bytes_total", "dynimg_saved_bytes_total",
                          "dynimg_cache_hits_total", "dynimg_render_seconds_count",
                          "dynimg_process_exits_total")
            and ("class", "none") not in key[1] and value}


def scrape_until(server, expected, seconds=20):
    """The scrape whose image figures equal `expected`, once every process has
    written its file (at most a second after its last request)."""
    deadline = time.monotonic() + seconds
    while True:
        reply = server.get("/images/_metrics")
        assert reply.status == 200
        samples = parse(reply.text)
        figures = image_figures(samples)
        if figures == image_figures(expected) or time.monotonic() > deadline:
            assert figures == image_figures(expected)
            return samples
        time.sleep(0.2)


def daemon_pids(parent):
    """mod_wsgi's daemon processes: the Apache parent's children named (wsgi:...)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat, \
                    open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                fields, command = stat.read(), cmdline.read()
        except (OSError, ValueError):
            continue
        if int(fields[fields.rindex(b")") + 2:].split()[1]) == parent and \
                command.startswith(b"(wsgi:"):
            pids.append(int(entry))
    return pids


def run_files(run_dir):
    return sorted(name for name in os.listdir(run_dir) if dynimg.METRICS_FILE.fullmatch(name))


def stats_json(config_path):
    result = subprocess.run([sys.executable, os.path.join(PROJECT, "dynimg.py"), "--config",
                             config_path, "stats", "--json"],
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def person_figures(summary):
    """What /_health and `stats` say of image requests, comparable with a scrape."""
    classes = {network: figures for network, figures in summary["classes"].items()
               if network != "none"}
    return classes, summary["renders"], summary["cache_hits"], summary["process_exits"]


def scrape_as_person(samples):
    counts = collections.Counter()
    for (name, labels), value in samples.items():
        if name.endswith("_bucket"):
            continue
        family = name if name in dynimg.METRICS else name + "_total"
        names = dynimg.METRICS.get(family, dynimg.METRICS["dynimg_render_seconds"])[2]
        counts[name, tuple(dict(labels)[label] for label in names)] += value
    return person_figures(dynimg.summarize_metrics(counts))


@pytest.fixture
def metrics_server(image_root):
    folder = shared_tempdir("dynimg-metrics-")
    run_dir = os.path.join(folder, "run")
    config_path = write_config(folder, image_root, server={"health_details": "yes"})
    servers = [ModWsgiExpress(config_path, processes=2, threads=4)]
    yield servers, config_path, run_dir
    servers[-1].stop()
    shutil.rmtree(folder, ignore_errors=True)


def test_two_processes_sum_exactly_through_kills_and_restarts(metrics_server, image_root):
    servers, config_path, run_dir = metrics_server
    server = servers[0]
    expected = collections.Counter()
    send_mix(server, image_root, expected)
    # the 404 picture: rendered once, then a hit, in whichever process
    expected["dynimg_render_seconds_count", ()] += 1
    expected["dynimg_cache_hits_total", ()] += 1
    samples = scrape_until(server, expected)
    assert samples["dynimg_requests_total", (("class", "none"), ("status", "400"))] == 2
    assert samples["dynimg_processes", ()] == 2
    assert samples["dynimg_render_seconds_bucket", (("le", "+Inf"),)] == \
        samples["dynimg_render_seconds_count", ()]
    saved = samples["dynimg_saved_bytes_total", (("class", "2g"),)]
    assert 0 < saved < samples["dynimg_source_bytes_total", (("class", "2g"),)]

    health = json.loads(server.get("/images/_health").body)["metrics"]
    assert person_figures(health) == scrape_as_person(samples)
    assert person_figures(stats_json(config_path)) == scrape_as_person(samples)

    # one daemon killed: its last file still counts, then folds into the retired total
    parent = int(run_files(run_dir)[0].split("-")[0])
    victim = daemon_pids(parent)[0]
    os.kill(victim, signal.SIGKILL)
    expected["dynimg_process_exits_total", ()] += 1
    scrape_until(server, expected)
    wait_for_new_daemons(parent, {victim})
    send_mix(server, image_root, expected)
    expected["dynimg_cache_hits_total", ()] += 2  # the 404 picture is cached by now
    scrape_until(server, expected)

    # a graceful restart keeps Apache's parent: both daemons are new, counting goes on
    os.kill(parent, signal.SIGUSR1)
    expected["dynimg_process_exits_total", ()] += 2
    wait_for_new_daemons(parent, set(daemon_pids(parent)))
    send_mix(server, image_root, expected)
    expected["dynimg_cache_hits_total", ()] += 2
    samples = scrape_until(server, expected)
    retired = run_files(run_dir)
    assert len(retired) <= 1 + 2 + 3  # the total, two live files, three folded lately

    # a full restart is a new server: counting starts afresh, the old files go
    server.stop()
    servers.append(ModWsgiExpress(config_path, processes=2, threads=4, port=server.port))
    server = servers[-1]
    fresh = collections.Counter()
    send_mix(server, image_root, fresh)
    fresh["dynimg_cache_hits_total", ()] += 2  # the result cache has outlived the server
    samples = scrape_until(server, fresh)  # lower than before: a reset Prometheus sees
    assert samples["dynimg_process_exits_total", ()] == 0
    assert not any(name.startswith(f"{parent}-") for name in os.listdir(run_dir))


def wait_for_new_daemons(parent, old, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pids = set(daemon_pids(parent))
        if len(pids) == 2 and not pids & old:
            return
        time.sleep(0.2)
    raise AssertionError(f"the daemons {old} were not replaced: {pids}")
