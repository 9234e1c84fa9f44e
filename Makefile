# The two commands of the quick start: `make demo` and `make test`. Each sets up .venv by itself.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint clean

$(STAMP): pyproject.toml scripts/setup_venv.sh
	bash scripts/setup_venv.sh
	touch $@

demo: $(STAMP)
	$(PY) -m attnc.demo

test: $(STAMP)
	$(VENV)/bin/ruff check attnc tests
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check attnc tests
	$(VENV)/bin/ruff format --check attnc tests

clean:
	rm -rf $(VENV) build *.egg-info
