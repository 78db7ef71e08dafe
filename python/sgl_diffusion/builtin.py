"""The built-in default model: a tiny FLUX.1-architecture pipeline with seeded random weights.

It lets `sgl-diffusion generate` run offline on a CPU right after installation. It is built on first
use from `sgl_diffusion.testing`'s deterministic recipe and cached in the user's cache folder. Its
images are noise-like: the weights are random. Point `--model-path` at a real checkpoint for real
images.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

#: Bump when the recipe changes so that stale caches are rebuilt.
BUILTIN_MODEL_NAME = "tiny-flux1-random-v1"
_FIXTURE = "flux1_dev"


def cache_root() -> Path:
    base = os.environ.get("SGL_DIFFUSION_CACHE") or os.environ.get("XDG_CACHE_HOME")
    return Path(base) / "sgl-diffusion" if base else Path.home() / ".cache" / "sgl-diffusion"


def builtin_model_path() -> Path:
    """The cached default model's folder, built on first use (about a second, offline)."""
    target = cache_root() / BUILTIN_MODEL_NAME
    if (target / "model_index.json").is_file():
        return target
    from .testing import build_fixture

    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a crash or a concurrent first run never leaves a
    # half-written model behind.
    staging = Path(tempfile.mkdtemp(prefix=f".{BUILTIN_MODEL_NAME}-", dir=target.parent))
    try:
        build_fixture(_FIXTURE, staging / "model")
        try:
            (staging / "model").rename(target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
