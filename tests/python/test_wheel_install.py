"""The README's first command on a brand-new machine: the wheel alone, with its runtime dependencies only.

The test environment has every test dependency installed, so a runtime dependency missing from
`pyproject.toml` (as `accelerate` once was: transformers needs it for `device_map`) would never show up
in the other tests. This one installs the built wheel and the kernels package into a new virtualenv
without the `test` extra, then runs `sgl-diffusion generate` on the built-in model from there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]


def built_wheel(tmp_path: Path) -> Path:
    """The wheel `make test` built into dist/ (SGL_DIFFUSION_WHEEL_DIR); built here when absent."""
    wheel_dir = Path(os.environ.get("SGL_DIFFUSION_WHEEL_DIR") or tmp_path / "dist")
    wheels = sorted(wheel_dir.glob("sgl_diffusion-*.whl"))
    if not wheels:
        build = [sys.executable, "-m", "maturin", "build", "--release", "--out", str(wheel_dir)]
        subprocess.run(build, cwd=REPO, check=True, timeout=1800)
        wheels = sorted(wheel_dir.glob("sgl_diffusion-*.whl"))
    assert len(wheels) == 1, f"expected one sgl-diffusion wheel in {wheel_dir}, found {wheels}"
    return wheels[0]


@pytest.mark.timeout(2400)
def test_the_wheel_installs_with_its_runtime_dependencies_and_generates(tmp_path: Path) -> None:
    wheel = built_wheel(tmp_path)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    # The lock pins the versions (so this run is reproducible) but adds no package: constraints only
    # apply to what the wheel itself requires.
    lock = os.environ.get("SGL_DIFFUSION_LOCK") or str(REPO / "requirements" / "test.txt")
    install = [sys.executable, "-m", "uv", "pip", "install", "-q", "--python", str(python), "-c", lock]
    subprocess.run([*install, str(REPO / "kernels"), str(wheel)], check=True, timeout=1200)

    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    # A cache of its own: the built-in model is built on first use, as on a new machine.
    env.update(SGL_DIFFUSION_CACHE=str(tmp_path / "cache"), HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    probe = (
        "import importlib.util, sgl_diffusion; print(sgl_diffusion.__file__); "
        "print(importlib.util.find_spec('pytest') is None, importlib.util.find_spec('openai') is None)"
    )
    installed = subprocess.run(
        [str(python), "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=True
    )
    package_file, no_pytest, no_openai = installed.stdout.split()
    assert Path(package_file).is_relative_to(venv), f"imported {package_file}, not the installed wheel"
    assert (no_pytest, no_openai) == ("True", "True"), "test-only packages leaked into the runtime install"

    out = tmp_path / "outputs"
    generate = subprocess.run(
        [str(venv / "bin" / "sgl-diffusion"), "generate", "--prompt", "a lighthouse at dawn", "--output-path", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert generate.returncode == 0, generate.stderr
    written = [Path(line) for line in generate.stdout.splitlines()]
    assert len(written) == 1 and written[0].parent == out, generate.stdout
    with Image.open(written[0]) as image:
        assert image.format == "PNG" and image.width > 0 and image.height > 0
