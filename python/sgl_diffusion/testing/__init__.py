"""Offline test fixtures: tiny random diffusers pipelines with deterministic weights and tokenizers.

    >>> from sgl_diffusion.testing import build_fixture, FIXTURES
    >>> build_fixture("flux1_dev", "/tmp/flux1_dev")  # doctest: +SKIP

or ``python -m sgl_diffusion.testing flux1_dev /tmp/flux1_dev``.
"""

from __future__ import annotations

from . import diffusers_backend as _diffusers_backend  # noqa: F401  (registers SD3, PixArt-Sigma, CogVideoX)
from . import flux2 as _flux2  # noqa: F401  (registers the FLUX.2 fixtures)
from . import glm_image as _glm_image  # noqa: F401  (registers the GLM-Image fixture)
from . import hunyuan_video as _hunyuan_video  # noqa: F401  (registers the HunyuanVideo fixture)
from . import hunyuan_video15 as _hunyuan_video15  # noqa: F401  (registers the HunyuanVideo-1.5 fixture)
from . import qwen_image as _qwen_image  # noqa: F401  (registers the Qwen-Image fixture)
from . import qwen_image_21 as _qwen_image_21  # noqa: F401  (registers the Qwen-Image 2.1 fixture)
from . import wan as _wan  # noqa: F401  (registers the Wan fixtures)
from . import z_image as _z_image  # noqa: F401  (registers the Z-Image fixture)
from .fixtures import (
    FIXTURE_REGISTRY,
    FixtureSpec,
    build_fixture,
    build_pipeline,
    perturb_constant_params,
    register_fixture,
    seeded_component,
)

FIXTURES: tuple[str, ...] = tuple(FIXTURE_REGISTRY)

__all__ = [
    "FIXTURES",
    "FIXTURE_REGISTRY",
    "FixtureSpec",
    "build_fixture",
    "build_pipeline",
    "perturb_constant_params",
    "register_fixture",
    "seeded_component",
]
