# dynimg: `make serve` sets up and serves the samples; `make test` sets up and tests.
PORT ?= 8000
HOST ?= 127.0.0.1
# Two processes (one a core) with a few threads each: renders are CPU-bound.
PROCESSES ?= 2
THREADS ?= 16
VENV := .venv
SERVER_ROOT := /tmp/dynimg-$(PORT)
# Apache's cache in front of dynimg is trimmed to this size
FRONT_CACHE_LIMIT ?= 512M
# Apache's own connections (cache hits, slow clients); too few and it keeps
# starting and reaping children under load, dropping kept-alive connections
MAX_CLIENTS ?= 64
# Seconds a response may make no progress towards its client before it is cut:
# a client reading a byte now and then holds a daemon thread no longer than this
RESPONSE_TIMEOUT ?= 10

DEBIAN_PACKAGES := apache2 apache2-dev build-essential python3-dev python3-venv \
	libjpeg-dev zlib1g-dev libpng-dev libwebp-dev libtiff-dev liblcms2-dev \
	libfreetype-dev libopenjp2-7-dev
TEST_DEBIAN_PACKAGES := chromium colord-data icc-profiles-free libgs-common nginx varnish wrk

# Huge pages for the large, short-lived image buffers that dynimg.tune_malloc()
# gives pages of their own: a fifth of the page faults, renders ~10 % faster.
# glibc reads it only at start-up, so it is set here for everything make starts.
export GLIBC_TUNABLES ?= glibc.malloc.hugetlb=1

# AVIF output and input come from an optional plugin, installed unless AVIF=no.
AVIF ?= yes

RUN_AS := $(if $(filter 0,$(shell id -u)),--user www-data --group www-data)

.PHONY: serve test bench soak screenshots setup debs avif access clean

serve: setup
	@$(VENV)/bin/python dynimg.py check
	@mkdir -p $(SERVER_ROOT)/htcache
	@$(if $(RUN_AS),chown www-data:www-data $(SERVER_ROOT)/htcache)
	@echo "dynimg: serving at http://$(HOST):$(PORT)/images/ (open /images/_demo?name=sunset.jpg)"
	@# Apache's cache in front (apache/cache.conf), trimmed by htcacheclean every
	@# minute (its shortest interval) while we serve; Apache refuses methods other
	@# than GET and HEAD itself (apache/methods.conf, which finds its files through
	@# DYNIMG_HOME)
	htcacheclean -d1 -n -t -p $(SERVER_ROOT)/htcache -l $(FRONT_CACHE_LIMIT) \
		-P $(SERVER_ROOT)/htcacheclean.pid; \
	trap 'kill $$(cat $(SERVER_ROOT)/htcacheclean.pid 2>/dev/null) 2>/dev/null' EXIT INT TERM; \
	DYNIMG_HOME=$(CURDIR) \
	$(VENV)/bin/mod_wsgi-express start-server dynimg.wsgi --host $(HOST) --port $(PORT) \
		--mount-point /images --processes $(PROCESSES) --threads $(THREADS) $(RUN_AS) \
		--max-clients $(MAX_CLIENTS) --server-root $(SERVER_ROOT) \
		--response-socket-timeout $(RESPONSE_TIMEOUT) \
		--include-file apache/methods.conf --include-file apache/cache.conf --log-to-terminal

test: setup
	scripts/setup debs $(TEST_DEBIAN_PACKAGES)
	$(VENV)/bin/python -m pytest

# Figures for the README: render speed against libvips, encoder settings, AVIF
# encoders and each format's quality scale, what each client receives per class
# (SSIMULACRA2), HTTP throughput against static files and thumbor, placeholders,
# routing by source behind Varnish, what /_metrics counts and costs. Not part of
# `make test`; 15-20 minutes.
bench: setup .venv-bench/.ready
	scripts/setup debs wrk varnish
	@echo "machine: $$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)," \
		"$$(nproc) cores, $$(grep -o -m1 -w avx2 /proc/cpuinfo || echo no avx2)"
	taskset -c 1 $(VENV)/bin/python bench/render.py
	$(VENV)/bin/python bench/formats.py
	$(VENV)/bin/python bench/delivery.py
	$(VENV)/bin/python bench/encoding.py
	$(VENV)/bin/python bench/throughput.py
	taskset -c 1 $(VENV)/bin/python bench/placeholders.py
	taskset -c 1 $(VENV)/bin/python bench/masters.py
	taskset -c 1 $(VENV)/bin/python bench/variants.py
	taskset -c 1 $(VENV)/bin/python bench/crops.py
	$(VENV)/bin/python bench/sharding.py
	$(VENV)/bin/python bench/metrics.py --svg docs/metrics-saved.svg
	$(VENV)/bin/python bench/animation.py

# Memory of the daemon processes under MINUTES of uncached renders.
MINUTES ?= 10
soak: setup
	scripts/setup debs wrk
	$(VENV)/bin/python bench/soak.py --minutes $(MINUTES)

# The demo page's pictures in docs/, remade in headless Chromium.
screenshots: setup
	scripts/setup debs chromium
	$(VENV)/bin/python scripts/screenshots

# libvips and thumbor for the comparisons live in their own venv, never in the
# runtime one.
.venv-bench/.ready: Makefile
	/usr/bin/python3 -m venv .venv-bench
	.venv-bench/bin/pip install -q pyvips==3.2.0 pyvips-binary==8.18.7 thumbor==7.8.0 \
		ssimulacra2==0.3.0
	touch $@

setup: debs $(VENV)/.ready avif access

debs:
	@scripts/setup debs $(DEBIAN_PACKAGES)

# Rebuilt only when what it installs changes: a second `make` installs nothing.
$(VENV)/.ready: setup.cfg scripts/setup
	scripts/setup venv
	touch $@

avif: $(VENV)/.ready
	@scripts/setup avif $(AVIF)

access: $(VENV)/.ready
	@scripts/setup access . $(VENV)

clean:
	rm -rf $(VENV) .pytest_cache
