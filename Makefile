# The two commands of the quick start: `make demo` and `make test`. Each sets up .venv by itself.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint gallery wheel clean

$(STAMP): pyproject.toml scripts/setup_venv.sh
	bash scripts/setup_venv.sh
	touch $@

demo: $(STAMP)
	$(PY) -m attnc.demo

# The tests run in one process per core (pytest-xdist): on CI's 2 cores, about half the time of one.
test: $(STAMP)
	$(VENV)/bin/ruff check attnc tests scripts examples benchmarks
	$(PY) -m pytest -q -n auto

# docs/gallery/*.png and docs/gallery.md, from examples/*.attn (attnc show --png of every pattern).
gallery: $(STAMP)
	$(PY) scripts/gallery.py

# dist/attnc-VERSION-py3-none-any.whl, for `pip install dist/attnc-*.whl` beside an existing torch
# (docs/install.md); built without build isolation, so no package index is needed.
wheel: $(STAMP)
	$(PY) -m pip wheel --no-deps --no-build-isolation -q -w dist .

lint: $(STAMP)
	$(VENV)/bin/ruff check attnc tests scripts examples benchmarks
	$(VENV)/bin/ruff format --check attnc tests scripts examples benchmarks

clean:
	rm -rf $(VENV) build dist *.egg-info
