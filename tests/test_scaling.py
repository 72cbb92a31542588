"""Scaling out, for real: three mod_wsgi-express backends behind varnishd and nginx
with the shipped cache/ configs, which route each request by the source it names.
Every variant of a source is rendered on one backend; a stopped backend's sources
move to another and come back when it is started again; a BAN from an allowed
address drops every cached variant of one source from Varnish, and nothing else."""

import http.client
import itertools
import os
import re
import subprocess
import threading
import time
import urllib.parse

import pytest

from test_cache_tier import Tier

#: Sources of several kinds and sizes, one of them in a sub-folder (its name has
#: slashes: the path form and ?name= must still meet on one backend).
SOURCES = ("photo-medium-1.jpg", "photo-medium-2.jpg", "photo-medium.png", "grayscale.jpg",
           "exif-orient-1.jpg", "exif-orient-6.jpg", "webp-lossy.webp", "jpeg-named.png",
           "progressive.jpg", "sub/dir/photo-medium-1.jpg")

#: How one variant is asked for, in turn: the path form, ?name=, and a network class
#: from a client hint (a Vary variant of the same URL form).
FORMS = ("path", "query", "hint")

#: Concurrent clients while a backend is stopped: at most this many requests are in
#: flight on it when it goes, so at most this many may fail.
CLIENTS = 2

#: Seconds to wait for a restarted backend to be used again: Varnish's probe needs two
#: good answers 2 s apart; nginx tries a failed server again after fail_timeout (10 s).
RETURN_SECONDS = 30


@pytest.fixture(params=["varnish", "nginx"])
def front(request, image_root):
    tier = Tier(request.param, image_root)
    yield tier
    tier.close()


@pytest.fixture
def varnish(image_root):
    tier = Tier("varnish", image_root)
    yield tier
    tier.close()


class Variants:
    """New variants of the sources, a new width each, so every one misses the front
    and is rendered by whichever backend the front chose."""

    def __init__(self, front):
        self.front = front
        self.counter = itertools.count()
        self.forms = itertools.cycle(FORMS)
        # nginx hashes ?name= as sent (it cannot decode a query value), so its slashes
        # are sent as slashes there; Varnish decodes, so they go as %2F
        self.safe = "/" if front.kind == "nginx" else ""

    def url(self, source, form):
        """(url, headers) of a variant of source not asked for before."""
        # a width below every source's own (wider ones would all be the source's own
        # size: one image, a result-cache hit), and a quality, together new each time
        number = next(self.counter)
        query = f"width={100 + number % 280}&quality={20 + number // 280 % 80}"
        if form == "query":
            name = urllib.parse.quote(source, safe=self.safe)
            return f"/images/?name={name}&{query}", {}
        return f"/images/{source}?{query}", {"ECT": "2g"} if form == "hint" else {}

    def ask_each(self, rounds=1):
        """`rounds` new variants of every source, interleaved, each form in turn; every
        answer a 200. Returns {source: [urls]}."""
        asked = {source: [] for source in SOURCES}
        for _, source in itertools.product(range(rounds), SOURCES):
            url, headers = self.url(source, next(self.forms))
            reply = self.front.get(url, headers=headers)
            assert reply.status == 200, f"{url} {headers}: {reply.status}"
            asked[source].append(url)
        return asked

    def owners(self, asked):
        """{source: the backends that rendered the variants asked for it}, checking
        that each variant was rendered exactly once."""
        urls = list(itertools.chain(*asked.values()))
        # each backend writes a request's log line just after its answer: on a busy
        # machine the last lines can come a little after the answers
        deadline = time.monotonic() + 10
        rendered = self.front.backends.rendered()
        while any(url not in rendered for url in urls) and time.monotonic() < deadline:
            time.sleep(0.1)
            rendered = self.front.backends.rendered()
        for url in urls:
            assert len(rendered.get(url, ())) == 1, f"{url} rendered on {rendered.get(url)}"
        return {source: set().union(*(rendered[url] for url in urls))
                for source, urls in asked.items()}


class Load:
    """CLIENTS clients asking for new variants round the sources until told to stop,
    noting every status: what the front answers while a backend goes away."""

    def __init__(self, variants):
        self.variants, self.statuses, self.going = variants, [], True
        self.threads = [threading.Thread(target=self._client, args=(offset,))
                        for offset in range(CLIENTS)]
        for thread in self.threads:
            thread.start()

    def _client(self, offset):
        sources = itertools.cycle(SOURCES[offset:] + SOURCES[:offset])
        while self.going:
            url, headers = self.variants.url(next(sources), "path")
            try:
                self.statuses.append(self.variants.front.get(url, headers=headers,
                                                             timeout=30).status)
            except OSError as error:
                self.statuses.append(repr(error))

    def stop(self):
        self.going = False
        for thread in self.threads:
            thread.join()
        return self.statuses


def test_each_source_is_rendered_on_one_backend_and_moves_only_while_it_is_down(front):
    variants = Variants(front)
    backends = front.backends
    if front.kind == "varnish":
        # a backend its probe has not passed yet would lend its sources to another
        for index in range(len(backends.ports)):
            _wait_for_health(front, index, "healthy")

    # every variant of a source (both URL forms, hinted or not) on one backend
    owners = variants.owners(variants.ask_each(rounds=len(FORMS)))
    assert all(len(where) == 1 for where in owners.values()), owners
    owner = {source: where.pop() for source, where in owners.items()}
    assert len(set(owner.values())) > 1, f"every source on one backend: {owner}"

    # the backend of the first source stops while clients keep asking: only requests
    # in flight on it may fail (both fronts retry those elsewhere, so mostly none does)
    down = owner[SOURCES[0]]
    load = Load(variants)
    time.sleep(0.5)
    backends.stop(down)
    time.sleep(1)
    statuses = load.stop()
    assert len(statuses) > 10
    failed = [status for status in statuses if status != 200]
    assert len(failed) <= CLIENTS and all(status in (502, 503, 504) for status in failed), \
        failed

    print(f"\n{front.kind}: sources per backend "
          f"{[list(owner.values()).count(index) for index in range(len(backends.ports))]}; "
          f"backend {down} stopped under load: {len(failed)} of {len(statuses)} failed")

    # its sources each go to one other backend; the others' sources stay where they were
    moved = variants.owners(variants.ask_each(rounds=2))
    assert all(len(where) == 1 for where in moved.values()), moved
    for source, where in moved.items():
        if owner[source] == down:
            assert down not in where
        else:
            assert where == {owner[source]}, f"{source} moved from {owner[source]} to {where}"
    if front.kind == "varnish":
        # until the probe marks it sick, Varnish's retries took its sources elsewhere;
        # from then on the director does, to the same backends
        _wait_for_health(front, down, "sick")
        assert variants.owners(variants.ask_each(rounds=1)) == moved

    # started again, it gets its sources back (Varnish: once its probe passes; nginx,
    # which has no probe: once fail_timeout has passed and a request tries it again)
    backends.start(down)
    deadline = time.monotonic() + RETURN_SECONDS
    while True:
        first = variants.url(SOURCES[0], "path")[0]
        assert front.get(first).status == 200
        if backends.rendered().get(first) == {down}:
            break
        assert time.monotonic() < deadline, f"backend {down} got no source back"
        time.sleep(0.3)
    back = variants.owners(variants.ask_each(rounds=1))
    assert back == {source: {owner[source]} for source in SOURCES}


def _wait_for_health(front, index, state, seconds=15):
    """Until Varnish's probe has found backend `index` (dynimg1 is index 0) `state`,
    as its log tells: "Went sick", "Still sick", "Went healthy"..."""
    name = f"dynimg{index + 1}"
    deadline = time.monotonic() + seconds
    while True:
        log = subprocess.run(["varnishlog", "-d", "-n", os.path.join(front.folder, "work"),
                              "-g", "raw", "-i", "Backend_health"],
                             capture_output=True, text=True, timeout=30).stdout
        states = re.findall(rf"Backend_health - {name} (?:Went|Still) (\w+)", log)
        if states and states[-1] == state:
            return
        assert time.monotonic() < deadline, f"{name} not {state} after {seconds} s: {states}"
        time.sleep(0.5)


def _ban(port, path, address="127.0.0.1"):
    """A BAN request to Varnish sent from `address` (any of 127/8 is this host)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                            source_address=(address, 0))
    try:
        connection.request("BAN", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


def test_a_ban_from_an_allowed_address_drops_every_variant_of_one_source_only(varnish):
    nested = "sub/dir/photo-medium-1.jpg"
    cached = {
        # both URL forms and a Vary variant of one source...
        nested: [("/images/sub/dir/photo-medium-1.jpg?width=210", {}),
                 ("/images/?name=sub%2Fdir%2Fphoto-medium-1.jpg&width=220", {}),
                 ("/images/sub/dir/photo-medium-1.jpg?width=210", {"ECT": "2g"})],
        # ...a source whose name ends the same...
        "photo-medium-1.jpg": [("/images/photo-medium-1.jpg?width=210", {}),
                               ("/images/?name=photo-medium-1.jpg&width=220", {})],
        # ...and another
        "photo-medium-2.jpg": [("/images/photo-medium-2.jpg?width=210", {}),
                               ("/images/?name=photo-medium-2.jpg&width=220",
                                {"ECT": "2g"})],
    }

    def cache_states(source):
        states = []
        for url, headers in cached[source]:
            reply = varnish.get(url, headers=headers)
            assert reply.status == 200
            states.append(reply.headers["X-Cache"])
        return states

    for source in cached:
        assert cache_states(source) == ["miss"] * len(cached[source])
        assert cache_states(source) == ["hit"] * len(cached[source])

    # from an address outside the ACL: refused, nothing dropped
    assert _ban(varnish.port, f"/images/{nested}", address="127.0.0.2")[0] == 403
    assert cache_states(nested) == ["hit"] * 3

    # from an allowed one: every variant of that source, and only those
    status, text = _ban(varnish.port, f"/images/{nested}")
    assert status == 200, text
    assert cache_states(nested) == ["miss"] * 3
    assert cache_states(nested) == ["hit"] * 3
    assert cache_states("photo-medium-1.jpg") == ["hit"] * 2
    assert cache_states("photo-medium-2.jpg") == ["hit"] * 2

    # the query form names a source as well
    assert _ban(varnish.port, "/images/?name=photo-medium-2.jpg")[0] == 200
    assert cache_states("photo-medium-2.jpg") == ["miss"] * 2
    assert cache_states("photo-medium-1.jpg") == ["hit"] * 2

    # a BAN that names no source is refused, not a ban of everything
    assert _ban(varnish.port, "/images/?width=100")[0] == 400
    assert cache_states("photo-medium-1.jpg") == ["hit"] * 2
