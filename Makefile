# The README's two commands: `make bench` (install + run the main job) and `make test` (install + run tests).
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST_DIR := /usr/share/datasets/fashion-mnist
STAMP := $(VENV)/.installed
CONSTRAINTS ?= constraints.txt
# the oldest torch (with its torchvision) and timm pyproject.toml allows; `make test-oldest` runs the suite on them (in .venv-oldest)
OLDEST_PINS := torch==2.11.0 torchvision==0.26.0 timm==1.0.21

.PHONY: bench test test-oldest setup data latex clean-venv gpu-kit

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[test]'
	touch $(STAMP)

setup: $(STAMP) data

data:
	@if [ ! -f $(FMNIST_DIR)/t10k-images-idx3-ubyte.gz ]; then \
	  echo "installing Debian package dataset-fashion-mnist"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi

# pdflatex and booktabs, for the test that typesets every LaTeX table the reports hold (tests only)
latex:
	@if ! command -v pdflatex >/dev/null || ! kpsewhich booktabs.sty >/dev/null; then \
	  echo "installing Debian packages texlive-latex-base texlive-latex-recommended (to typeset the LaTeX tables)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq --no-install-recommends \
	    texlive-latex-base texlive-latex-recommended; \
	fi

bench: setup
	$(PY) run_bench.py

test: setup latex
	$(PY) -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

# constraints.txt with the oldest pins instead of its torch, torchvision and timm (and without the CUDA wheels torch 2.15 pulls in)
.venv-oldest.constraints: constraints.txt Makefile
	grep -vE '^(torch|torchvision|timm|triton)==|^(cuda|nvidia)-' constraints.txt > $@
	printf '%s\n' $(OLDEST_PINS) >> $@

test-oldest: .venv-oldest.constraints
	$(MAKE) test VENV=.venv-oldest CONSTRAINTS=.venv-oldest.constraints

# what benchmarks/gpu_check.sh needs on a lent GPU machine that can fetch nothing (carry .gpu): Fashion-MNIST and the
# wheel of constraints.txt's timm (that machine's python3 brings torch)
gpu-kit: setup
	mkdir -p .gpu/fashion-mnist .gpu/wheels
	cp $(FMNIST_DIR)/*-idx?-ubyte.gz .gpu/fashion-mnist/
	$(PY) -m pip download -q --no-deps --only-binary=:all: -d .gpu/wheels $$(grep -i '^timm==' $(CONSTRAINTS))

clean-venv:
	rm -rf $(VENV)
