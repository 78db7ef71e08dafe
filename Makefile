# Developer commands. `make help` lists them.
PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.DEFAULT_GOAL := help
.PHONY: help install install-test demo test test-rust test-python lint format wheel clean

help: ## List the developer commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install: ## Install sgl-diffusion with its runtime dependencies (builds the Rust extension)
	$(PIP) install ./kernels .

demo: install ## Install, then generate an image with the built-in default model (offline, CPU ok)
	sgl-diffusion generate --prompt "a lighthouse at dawn" --output-path outputs

install-test: ## Install in editable mode with the test dependencies
	$(PIP) install -e ./kernels -e ".[test]"

test: install-test test-rust test-python ## Install what tests need, then run every test (Rust and Python)

test-rust: ## cargo test for the whole workspace
	cargo test --workspace

test-python: ## pytest (CPU; builds tiny fixtures offline)
	$(PYTHON) -m pytest -q

lint: ## rustfmt, clippy (warnings are errors) and ruff
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings
	$(PYTHON) -m ruff check python tests benches kernels
	$(PYTHON) -m ruff format --check python tests benches kernels

format: ## Format Rust and Python sources
	cargo fmt --all
	$(PYTHON) -m ruff format python tests benches kernels
	$(PYTHON) -m ruff check --fix python tests benches kernels

wheel: ## Build the abi3 wheel (one wheel for CPython 3.10+) into dist/
	maturin build --release --out dist

clean: ## Remove build outputs
	cargo clean
	rm -rf dist build outputs
