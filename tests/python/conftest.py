"""Shared fixtures: one tiny FLUX.1 checkpoint per session, and engines on it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# No hub access in tests: everything loads from folders the tests build.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

#: The fixture's sampling settings used across tests (32x32, 3 steps: fast on 2 CPU cores).
SMALL = {"height": 32, "width": 32, "num_inference_steps": 3, "max_sequence_length": 32}


@pytest.fixture(scope="session")
def flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sgl_diffusion.testing import build_fixture

    return build_fixture("flux1_dev", tmp_path_factory.mktemp("models") / "flux1_dev")


@pytest.fixture(scope="session")
def diffusers_flux(flux_dir: Path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(flux_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def generator(flux_dir: Path) -> Iterator:
    """The engine on the fixture, CPU fp32, one request per batch."""
    from sgl_diffusion import DiffGenerator

    gen = DiffGenerator.from_pretrained(flux_dir, device="cpu", dit_precision="fp32", vae_precision="fp32")
    yield gen
    gen.shutdown()


@pytest.fixture(scope="session")
def batching_generator(flux_dir: Path) -> Iterator:
    """The engine with batching on: up to 8 images, waiting up to 1.5 s for company."""
    from sgl_diffusion import DiffGenerator

    gen = DiffGenerator.from_pretrained(
        flux_dir, device="cpu", dit_precision="fp32", vae_precision="fp32", max_batch_size=8, batch_delay_ms=1500
    )
    yield gen
    gen.shutdown()
