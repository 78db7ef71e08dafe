"""LoRA management over HTTP, against a real `sgl-diffusion serve` process (CPU, the tiny FLUX.1 fixture): SGLang's
routes with curl-shaped JSON, images from the official `openai` client that carry the merged adapter and lose it
on unmerge, `--lora-dir` confinement and the API key."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import numpy as np
import pytest
import torch
from openai import OpenAI
from PIL import Image

from lora_files import FLUX_MODULES, random_lora, save_lora
from server_util import Server, running_server
from sgl_diffusion import DiffGenerator
from sgl_diffusion.loading import load_native_model
from sgl_diffusion.models.flux import FluxTransformer2DModel

API_KEY = "lora-admin-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
FAST = {"num_inference_steps": 2, "max_sequence_length": 16, "seed": 3, "guidance_scale": 3.5}
PROMPT = "a red fox"


@pytest.fixture(scope="module")
def lora_dir(flux_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = load_native_model(
        FluxTransformer2DModel.from_config, flux_dir / "transformer", torch.device("cpu"), torch.float32
    )
    root = tmp_path_factory.mktemp("lora_root")
    (root / "loras" / "style").mkdir(parents=True)
    save_lora(
        random_lora(model, FLUX_MODULES, 4, 21, alpha=4.0, scale=0.3),
        root / "loras" / "style" / "pytorch_lora_weights.safetensors",
    )
    save_lora(random_lora(model, FLUX_MODULES, 4, 22, scale=0.3), root / "outside.safetensors")
    return root / "loras"


@pytest.fixture(scope="module")
def server(flux_dir: Path, lora_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    out = tmp_path_factory.mktemp("lora_out")
    flags = ["--lora-dir", str(lora_dir), "--api-key", API_KEY, "--output-dir", str(out)]
    with running_server(flux_dir, *flags, timeout=300) as running:
        yield running


def post(server: Server, route: str, body: dict | None = None, headers: dict | None = None) -> httpx.Response:
    return httpx.post(f"{server.base_url}{route}", json=body, headers=AUTH if headers is None else headers, timeout=120)


def openai_image(server: Server) -> np.ndarray:
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    result = client.images.generate(prompt=PROMPT, size="32x32", response_format="b64_json", extra_body=FAST)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))))


def test_set_generate_unmerge_and_list(server: Server, lora_dir: Path, flux_dir: Path) -> None:
    base = openai_image(server)
    folder = lora_dir / "style"
    response = post(server, "/v1/set_lora", {"lora_nickname": "style", "lora_path": str(folder), "strength": 0.8})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "ok" and "style" in body["message"]
    assert body["active"] == {
        "transformer": [{"nickname": "style", "path": str(folder), "merged": True, "strength": 0.8}]
    }
    styled = openai_image(server)
    assert np.abs(styled.astype(int) - base.astype(int)).max() > 0
    # The server's image is the engine's with the same adapter merged in process.
    engine = DiffGenerator.from_pretrained(flux_dir, device="cpu", dit_precision="fp32", vae_precision="fp32")
    try:
        engine.set_lora("style", folder, strength=0.8)
        fields = {k: v for k, v in FAST.items()}
        expected = engine.generate(PROMPT, height=32, width=32, **fields).images[0]
    finally:
        engine.shutdown()
    np.testing.assert_array_equal(styled, np.asarray(expected))
    # Unmerge (an empty body means every target) gives the base back; merge again gives the adapter back.
    response = httpx.post(f"{server.base_url}/v1/unmerge_lora_weights", headers=AUTH, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["active"]["transformer"][0]["merged"] is False
    np.testing.assert_array_equal(openai_image(server), base)
    assert post(server, "/v1/merge_lora_weights", {"target": "all"}).status_code == 200
    np.testing.assert_array_equal(openai_image(server), styled)
    listed = httpx.get(f"{server.base_url}/v1/list_loras", headers=AUTH, timeout=60).json()
    assert listed == {"loaded_adapters": [{"nickname": "style", "path": str(folder)}], "active": body["active"]}
    assert post(server, "/v1/unmerge_lora_weights", {"target": "transformer"}).status_code == 200


def test_a_request_brings_its_own_adapter(server: Server, lora_dir: Path) -> None:
    """`lora` on /v1/images/generations (here through the openai client's extra_body): the request's own adapter,
    the others' images untouched; an unknown nickname is a 400 naming `lora`."""
    assert (
        post(server, "/v1/set_lora", {"lora_nickname": "style", "lora_path": str(lora_dir / "style")}).status_code
        == 200
    )
    merged = openai_image(server)
    assert post(server, "/v1/unmerge_lora_weights", {}).status_code == 200
    base = openai_image(server)
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    extra = {**FAST, "lora": [{"nickname": "style", "strength": 1.0}]}
    result = client.images.generate(prompt=PROMPT, size="32x32", response_format="b64_json", extra_body=extra)
    own = np.asarray(Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json))))
    # The unmerged path rounds differently from the merged weights: at most one 8-bit level apart.
    assert np.abs(own.astype(int) - merged.astype(int)).max() <= 1
    assert np.abs(own.astype(int) - base.astype(int)).max() > 1
    np.testing.assert_array_equal(openai_image(server), base)
    body = {"prompt": PROMPT, "size": "32x32", **FAST, "lora": [{"nickname": "ghost"}]}
    response = httpx.post(f"{server.base_url}/v1/images/generations", json=body, headers=AUTH, timeout=120)
    assert response.status_code == 400 and response.json()["error"]["param"] == "lora", response.text


def test_bad_requests_are_400s_naming_the_field_and_the_key_guards_the_routes(server: Server, lora_dir: Path) -> None:
    def error(response: httpx.Response) -> dict:
        assert response.status_code == 400, response.text
        return response.json()["error"]

    before = httpx.get(f"{server.base_url}/v1/list_loras", headers=AUTH, timeout=60).json()
    outside = lora_dir.parent / "outside.safetensors"
    assert (
        error(post(server, "/v1/set_lora", {"lora_nickname": "x", "lora_path": str(outside)}))["param"] == "lora_path"
    )
    climbing = str(lora_dir / ".." / "outside.safetensors")
    assert error(post(server, "/v1/set_lora", {"lora_nickname": "x", "lora_path": climbing}))["param"] == "lora_path"
    assert error(post(server, "/v1/set_lora", {"lora_nickname": "ghost"}))["param"] == "lora_nickname"
    bad_target = {"lora_nickname": "x", "lora_path": str(lora_dir / "style"), "target": "unet"}
    assert error(post(server, "/v1/set_lora", bad_target))["param"] == "target"
    lengths = {"lora_nickname": ["a", "b"], "lora_path": [str(lora_dir / "style")]}
    assert error(post(server, "/v1/set_lora", lengths))["param"] == "lora_path"
    dynamic = {"lora_nickname": "x", "lora_path": str(lora_dir / "style"), "merge_mode": "dynamic"}
    assert error(post(server, "/v1/set_lora", dynamic))["param"] == "merge_mode"
    assert "unknown field" in error(post(server, "/v1/set_lora", {"lora_nickname": "x", "scale": 2}))["message"]
    assert post(server, "/v1/set_lora", {"lora_nickname": "x"}, headers={}).status_code == 401
    assert httpx.get(f"{server.base_url}/v1/list_loras", timeout=60).status_code == 401
    # Nothing changed, and the server still serves.
    assert httpx.get(f"{server.base_url}/v1/list_loras", headers=AUTH, timeout=60).json() == before
    assert openai_image(server).shape == (32, 32, 3)
