# `make test` and `make demo` set themselves up: a local .venv with everything installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch and torchvision must be a matching pair (PyPI's torchvision does not import beside
# every torch build); these two are known to work together.
TORCH_PACKAGES ?= torch==2.14.1 torchvision==0.29.1

# Datasette's 1.0 alpha line, checked beside the stable release that .venv holds: an overlay venv
# with only Datasette (pinned) in it, which imports everything else (torch, open_clip, this package)
# from .venv through a .pth file.
DATASETTE_ALPHA ?= 1.0a41
VENV_DS1 ?= .venv-datasette-1.0
PY_DS1 := $(VENV_DS1)/bin/python
# The plugin's and the browser's tests, run on both lines by `make test`.
DATASETTE_TESTS := tests/test_plugin.py tests/test_permissions.py tests/test_never_5xx.py \
  tests/test_hostile_input.py tests/test_bounded_work.py tests/test_query_terms.py tests/test_map_page.py \
  tests/test_index_updates.py tests/test_startup.py tests/test_page.py tests/test_about.py \
  tests/test_browser.py tests/test_browser_map.py tests/test_provenance.py tests/test_connections.py \
  tests/test_uploads.py tests/test_web_reliability.py tests/test_words_search.py tests/test_docs.py

.PHONY: install install-datasette-1.0 test-datasette-1.0 chromium demo test bench bench-loader bench-search bench-search-curve bench-soak check-datasette-suite clean

$(VENV)/.installed: setup.py ruff.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PACKAGES)
	$(PY) -m pip install -q -e '.[load,test]'
	touch $@

# OpenSeadragon, the map page's deep-zoom viewer: fetched pinned from the npm registry and checked
# against its published SHA-512 (not committed: it is not our code); the wheel packages it.
VIEWER := datasette_mapclip/static/vendor/openseadragon/VERSION
$(VIEWER): datasette_mapclip/web/vendor.py | $(VENV)/.installed
	$(PY) -m datasette_mapclip.web.vendor

install: $(VENV)/.installed $(VIEWER)

# Offline demo: draw maps, train a small CLIP on them, load, serve on http://127.0.0.1:8001/-/mapclip
demo: install
	$(PY) -m fine_tune.demo demo --port $(or $(PORT),8001)

# Wheel (and sdist, with `build` installed) of this checkout into dist/, for publishing an
# unreleased checkout: README.md, "Publishing".  Builds with the venv's setuptools: no download.
DIST ?= dist
.PHONY: dist
dist: install
	@mkdir -p $(DIST) && rm -rf build $(DIST)/datasette[-_]mapclip-*  # build/: no stale modules in the wheel
	@if $(PY) -c 'import build' 2>/dev/null; then \
	  $(PY) -m build --no-isolation --outdir $(DIST) . >/dev/null; \
	else \
	  echo "python -m build is not installed: building the wheel only, with pip"; \
	  $(PY) -m pip wheel -q --no-deps --no-build-isolation --wheel-dir $(DIST) .; \
	fi
	@ls -1 $(DIST)/datasette[-_]mapclip-*

# The browser test drives Debian's Chromium (test tools cannot download their own browsers here).
chromium:
	@command -v chromium >/dev/null 2>&1 || test -x "$${MAPCLIP_CHROMIUM:-/usr/bin/chromium}" || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  (echo "Could not install chromium; install it (or set MAPCLIP_CHROMIUM) for the browser test" && exit 1)

test: install chromium
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests
	$(MAKE) test-datasette-1.0

$(VENV_DS1)/.installed: $(VENV)/.installed
	rm -rf $(VENV_DS1)
	$(PYTHON) -m venv $(VENV_DS1)
	$(PY) -c 'import site; print("import site; site.addsitedir(%r)" % site.getsitepackages()[0])' \
	  > "$$($(PY_DS1) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/mapclip_main_venv.pth"
	$(PY_DS1) -m pip install -q "datasette==$(DATASETTE_ALPHA)"
	touch $@

install-datasette-1.0: $(VENV_DS1)/.installed

# The plugin's and browser tests on Datasette $(DATASETTE_ALPHA) (its own site-packages come first).
test-datasette-1.0: install-datasette-1.0 chromium
	$(PY_DS1) -c 'import datasette.version as v; assert v.__version__ == "$(DATASETTE_ALPHA)", v.__version__'
	$(PY_DS1) -m pytest -q -p no:cacheprovider $(DATASETTE_TESTS)

# Benchmarks (ViT-B-32 with random weights on this machine's CPU), results in bench/results/:
# loader throughput (~10 min) and search latency/recall at 562,842 vectors (~15 min, first run).
bench: bench-loader bench-search

bench-loader: install
	$(PY) bench/loader_bench.py

# bench-search: every search-at-scale goal at 562,842 maps (~15 min once the collection is built):
# latency, filters, start-up and memory; 16 concurrent clients; a collection changing while served;
# all gathered into bench/results/search.md.  bench-search-curve: the same at 100,000 and 2,000,000.
SEARCH_DB := bench/.cache/search-562842-catalogue.db
bench-search: install
	$(PY) bench/search_bench.py
	$(PY) bench/soak_bench.py --db $(SEARCH_DB) --clients 16 --mix text=0.5,like=0.5 --no-hostile \
	  --threads 1 --output bench/results/concurrency.md
	$(PY) bench/changing_bench.py --db $(SEARCH_DB)
	$(PY) bench/search_summary.py

bench-search-curve: install
	$(PY) bench/search_bench.py --rows 100000 --output bench/results/search-100k.md
	$(PY) bench/search_bench.py --rows 2000000 --queries 100 --filter-queries 20 --output bench/results/search-2m.md
	$(PY) bench/search_summary.py

# Load and soak (~5 min once its collection is built), then every read route for 10 min: bench/results/soak.md
bench-soak: install
	$(PY) bench/soak_bench.py
	$(PY) bench/read_routes_soak.py

# Datasette's own test suite with this plugin registered, run outside the repository (~10 min)
check-datasette-suite: install
	MAIN_VENV=$(abspath $(VENV)) checks/datasette-suite.sh

clean:
	rm -rf $(VENV) $(VENV_DS1) *.egg-info .pytest_cache
