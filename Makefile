# The README's two commands: `make bench` (install + run the main job) and `make test` (install + run tests).
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST_DIR := /usr/share/datasets/fashion-mnist
STAMP := $(VENV)/.installed

.PHONY: bench test setup data clean-venv

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP) data

data:
	@if [ ! -f $(FMNIST_DIR)/t10k-images-idx3-ubyte.gz ]; then \
	  echo "installing Debian package dataset-fashion-mnist"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi

bench: setup
	$(PY) run_bench.py

test: setup
	$(PY) -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

clean-venv:
	rm -rf $(VENV)
