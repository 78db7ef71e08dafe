# Developer commands. `make help` lists them.
#
# The test targets never use the Python environment they are started from: each builds a brand-new
# virtualenv and installs an exact set of packages into it, so a run never leans on whatever the
# machine happened to have installed by hand.
#   make test         the locked set (requirements/test.txt), the README's test command and CI's
#   make test-latest  the newest versions PyPI resolves today
#   make test-lowest  the lower bounds pyproject.toml declares
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
VENV ?= .venv
LOCK ?= requirements/test.txt

.DEFAULT_GOAL := help
.PHONY: help install demo venv install-test test test-latest test-lowest test-rust test-python soak-fuzz-long lint format lock wheel clean

help: ## List the developer commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install: ## Install sgl-diffusion with its runtime dependencies into the current environment
	$(PIP) install ./kernels .

demo: install ## Install, then generate an image with the built-in default model (offline, CPU ok)
	sgl-diffusion generate --prompt "a lighthouse at dawn" --output-path outputs

# $(1): the virtualenv's folder. uv comes from the lock too, so the installer is pinned as well.
define new_venv
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install -q --disable-pip-version-check -c $(LOCK) uv
endef

# $(1): the virtualenv's folder. The checkout is installed editable (the extension is built in place,
# reusing target/'s release build) without resolving anything: its dependencies are already there.
define install_checkout
	$(1)/bin/uv pip install -q --python $(1)/bin/python --no-deps -e ./kernels -e .
	rm -f dist/sgl_diffusion-*.whl
	$(1)/bin/maturin build --release --out dist
endef

venv: ## A brand-new .venv holding exactly the locked test set plus this checkout (editable)
	$(call new_venv,$(VENV))
	$(VENV)/bin/uv pip sync -q --python $(VENV)/bin/python $(LOCK)
	$(call install_checkout,$(VENV))

install-test: venv ## Alias of `venv`

test: venv ## Install exactly the locked test set into a new virtualenv, then run every test (Rust and Python)
	$(MAKE) test-rust test-python VENV=$(VENV)

# $(1): the virtualenv's folder, $(2): the requirements file to write, $(3): how uv resolves.
define test_resolved
	$(call new_venv,$(1))
	$(1)/bin/uv pip compile -q pyproject.toml --extra test $(3) --custom-compile-command "make $@" -o $(2)
	$(1)/bin/uv pip sync -q --python $(1)/bin/python $(2)
	$(call install_checkout,$(1))
	$(MAKE) test-rust test-python VENV=$(1) LOCK=$(2)
endef

test-latest: ## Every test on the newest versions PyPI resolves today (records them in requirements/latest-tested.txt)
	$(call test_resolved,.venv-latest,requirements/latest-tested.txt,--upgrade)

test-lowest: ## Every test on pyproject.toml's lower bounds (records them in requirements/lowest-tested.txt)
	$(call test_resolved,.venv-lowest,requirements/lowest-tested.txt,--resolution lowest-direct)

# Commands run as in an activated virtualenv: its `python3` (which PyO3's build links) and console
# scripts (`sgl-diffusion`) come first on PATH.
IN_VENV = PATH="$(abspath $(VENV))/bin:$$PATH" VIRTUAL_ENV="$(abspath $(VENV))"

test-rust: ## cargo test for the whole workspace
	$(IN_VENV) cargo test --workspace

test-python: ## pytest in the virtualenv (CPU; builds tiny fixtures offline; one test installs the wheel from dist/)
	$(IN_VENV) SGL_DIFFUSION_WHEEL_DIR=$(abspath dist) SGL_DIFFUSION_LOCK=$(abspath $(LOCK)) python -m pytest -q

SOAK_RESULTS := benches/results/soak_fuzz_cpu.md

soak-fuzz-long: ## 30 min of schemathesis (>= 10 000 cases) and a 3 000-request soak; result in benches/results/
	printf '# Soak and fuzz, long run\n\n* Machine: %s, %s cores, CPU only\n* Commit: `%s`\n* Command: `make soak-fuzz-long`\n' \
		"$$(uname -m)" "$$(nproc)" "$$(git rev-parse --short HEAD)" > $(SOAK_RESULTS)
	$(IN_VENV) SGL_SOAK_REQUESTS=3000 SGL_FUZZ_EXAMPLES=5000 SGL_FUZZ_MAX_TIME=900 \
		SGL_SOAK_FUZZ_RESULTS=$(abspath $(SOAK_RESULTS)) python -m pytest -q -p no:cacheprovider -o timeout=4000 \
		tests/python/test_soak_fuzz.py

lint: ## rustfmt, clippy (warnings are errors) and ruff (the locked version, from the virtualenv)
	cargo fmt --all --check
	$(IN_VENV) cargo clippy --workspace --all-targets -- -D warnings
	$(VENV)/bin/python -m ruff check python tests benches kernels
	$(VENV)/bin/python -m ruff format --check python tests benches kernels

format: ## Format Rust and Python sources
	cargo fmt --all
	$(VENV)/bin/python -m ruff format python tests benches kernels
	$(VENV)/bin/python -m ruff check --fix python tests benches kernels

lock: ## Re-resolve requirements/test.txt: the newest versions allowed by pyproject.toml, for Python 3.11+
	$(PIP) install -q uv
	$(PYTHON) -m uv pip compile -q pyproject.toml --extra test --universal --python-version 3.11 \
		--upgrade --custom-compile-command "make lock" -o $(LOCK)

wheel: ## Build the abi3 wheel (one wheel for CPython 3.11+) into dist/
	maturin build --release --out dist

clean: ## Remove build outputs and the test virtualenvs
	cargo clean
	rm -rf dist build outputs $(VENV) .venv-latest .venv-lowest
