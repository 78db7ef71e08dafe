"""`sgl-diffusion serve` as clients use it: a real server process on a real port, spoken to with the
official `openai` client and with raw HTTP (CPU, the tiny FLUX.1 fixture, 32x32 images in 2 steps)."""

from __future__ import annotations

import base64
import io
import json
import re
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
from openai import OpenAI
from PIL import Image

from server_util import Server, metric_value, running_servers, wait_for

#: Sampling settings that keep every generation well under a second on CPU.
FAST = {"num_inference_steps": 2, "max_sequence_length": 16}
#: A complete, valid raw request body.
GOOD = {"prompt": "a red fox", "size": "32x32", **FAST}
#: Steps that keep a 32x32 request running for several seconds on CPU (15-40 ms a step on 2 cores).
SLOW_STEPS = 300
API_KEY = "secret"
ALIAS = "dall-e-3"
ORIGIN = "http://example.com"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ERROR_FIELDS = {"message", "type", "param", "code"}


# --- helpers -------------------------------------------------------------------------------------------


def png_size(data: bytes) -> tuple[int, int]:
    assert data.startswith(PNG_MAGIC), data[:16]
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return image.size


def bearer(key: str = API_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def generate(
    server: Server, body: dict[str, Any], headers: dict[str, str] | None = None, timeout: float = 120
) -> httpx.Response:
    return httpx.post(f"{server.base_url}/v1/images/generations", json=body, headers=headers or {}, timeout=timeout)


def post_raw(
    server: Server, content: bytes, content_type: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    return httpx.post(
        f"{server.base_url}/v1/images/generations",
        content=content,
        headers={"Content-Type": content_type, **(headers or {})},
        timeout=120,
    )


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """Checks the status and that the body is the OpenAI error body; returns its `error` object."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == ERROR_FIELDS, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    return error


def assert_good_request_succeeds(server: Server, headers: dict[str, str] | None = None) -> None:
    response = generate(server, GOOD, headers)
    assert response.status_code == 200, response.text[:500]
    (item,) = response.json()["data"]
    assert png_size(base64.b64decode(item["b64_json"])) == (32, 32)


def queue_depth(server: Server, headers: dict[str, str] | None = None) -> float:
    return server.metric("sgl_diffusion_queue_depth", headers=headers)


def batches_started(server: Server, headers: dict[str, str] | None = None) -> int:
    return sum(server.batches_run(headers).values())


class Background:
    """Runs one call on a thread and keeps its result or exception."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            self.result = call()
        except BaseException as err:  # noqa: BLE001 - handed to the test thread by join()
            self.error = err

    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float = 120) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the background call did not finish"
        if self.error is not None:
            raise self.error
        return self.result


@contextmanager
def raw_request(server: Server, body: dict[str, Any], headers: dict[str, str] | None = None) -> Iterator[socket.socket]:
    """Sends a generation request over a raw socket and yields the socket without reading the answer.
    Leaving the block closes the socket: the client went away, so the server cancels the request."""
    payload = json.dumps(body).encode()
    head = {
        "Host": f"127.0.0.1:{server.port}",
        "Content-Type": "application/json",
        "Content-Length": str(len(payload)),
        **(headers or {}),
    }
    request = "POST /v1/images/generations HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(request.encode() + payload)
        yield sock


def answered(sock: socket.socket) -> bool:
    """Whether the server has written anything (an answer, or closed the connection) on `sock`."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


@contextmanager
def engine_busy(server: Server, headers: dict[str, str] | None = None) -> Iterator[socket.socket]:
    """Keeps the engine busy inside the block with a 1000-step 256x256 request (about 100 s on 2 CPU
    cores, ~0.1 s a step: the block never outlasts it) sent over a raw socket; returns once it runs
    and yields its socket. Leaving the block closes the socket: the client went away, so the server
    cancels the request between two steps and the engine is free again."""
    started = batches_started(server, headers)
    body = {**GOOD, "prompt": "keeps the engine busy", "size": "256x256", "num_inference_steps": 1000}
    with raw_request(server, body, headers) as sock:
        wait_for(lambda: batches_started(server, headers) > started, timeout=30, what="the busy request to run")
        yield sock


# --- servers ---------------------------------------------------------------------------------------------

#: Seconds allowed for the servers, loading in parallel, to become ready.
READY_TIMEOUT = 300


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("outputs")


@pytest.fixture(scope="module")
def servers(request: pytest.FixtureRequest, flux_dir: Path, output_dir: Path) -> Iterator[dict[str, Server]]:
    """Every server the selected tests use, by fixture name, started at once so that they load in
    parallel (each fixture below waits for its own)."""
    flags = {
        # CORS off, 16 MiB bodies, no key; also answers to `dall-e-3`.
        "server": ["--served-model-name", ALIAS],
        # Batches up to 8 requests, waiting generously for company; CORS on for one origin.
        "batching_server": ["--max-batch-size", "8", "--batch-delay-ms", "2000", "--cors-origin", ORIGIN],
        # Needs a key; url outputs live 2 s; 1 MiB bodies; one request running and one waiting.
        "limited_server": [
            *("--api-key", API_KEY, "--output-ttl", "2", "--output-dir", str(output_dir)),
            *("--max-body-mb", "1", "--max-queue-size", "1", "--max-batch-size", "1"),
        ],
        # Shut down by its test.
        "doomed_server": [],
    }
    selected = [item for item in request.session.items if getattr(item, "module", None) is request.module]
    wanted = {name for item in selected for name in getattr(item, "fixturenames", ())}
    with running_servers(flux_dir, {name: extra for name, extra in flags.items() if name in wanted}) as launched:
        yield launched


@pytest.fixture(scope="module")
def server(servers: dict[str, Server]) -> Server:
    return servers["server"].wait_ready(READY_TIMEOUT)


@pytest.fixture(scope="module")
def client(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def batching_server(servers: dict[str, Server]) -> Server:
    return servers["batching_server"].wait_ready(READY_TIMEOUT)


@pytest.fixture(scope="module")
def limited_server(servers: dict[str, Server]) -> Server:
    return servers["limited_server"].wait_ready(READY_TIMEOUT)


@pytest.fixture(scope="module")
def doomed_server(servers: dict[str, Server]) -> Server:
    return servers["doomed_server"].wait_ready(READY_TIMEOUT)


# --- the official openai client --------------------------------------------------------------------------


def test_openai_client_b64_json_gives_pngs_of_the_requested_size(client: OpenAI, flux_dir: Path) -> None:
    result = client.images.generate(
        model=str(flux_dir), prompt="a red fox", size="32x48", response_format="b64_json", extra_body=FAST
    )
    (image,) = result.data
    assert image.url is None
    assert png_size(base64.b64decode(image.b64_json)) == (32, 48)
    assert result.created > 0


def test_openai_client_n_2_with_an_alias(client: OpenAI) -> None:
    result = client.images.generate(
        model=ALIAS, prompt="two foxes", size="32x48", n=2, response_format="b64_json", extra_body=FAST
    )
    assert len(result.data) == 2
    for image in result.data:
        assert png_size(base64.b64decode(image.b64_json)) == (32, 48)


def test_openai_client_url_outputs_are_absolute_and_download(client: OpenAI, server: Server) -> None:
    result = client.images.generate(prompt="a blue fox", size="32x48", n=2, response_format="url", extra_body=FAST)
    assert len(result.data) == 2
    for variant, image in enumerate(result.data):
        assert image.b64_json is None
        pattern = rf"http://127\.0\.0\.1:{server.port}/v1/images/[A-Za-z0-9_-]+/content\?variant={variant}"
        assert re.fullmatch(pattern, image.url), image.url
        download = httpx.get(image.url, timeout=30)
        assert download.status_code == 200
        assert download.headers["content-type"] == "image/png"
        assert png_size(download.content) == (32, 48)


def test_openai_client_sees_the_error_body(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.images.generate(prompt="a fox", size="40x32", extra_body=FAST)
    assert raised.value.status_code == 400
    assert raised.value.param == "size"
    with pytest.raises(openai.NotFoundError) as missing:
        client.images.generate(model="gpt-image-1", prompt="a fox", size="32x32", extra_body=FAST)
    assert missing.value.code == "model_not_found"


# --- bad inputs ------------------------------------------------------------------------------------------


def body(**fields: Any) -> bytes:
    return json.dumps({**GOOD, **fields}).encode()


BAD_REQUESTS = [
    # (id, raw body, content type, status, param)
    ("size-not-WxH", body(size="abc"), "application/json", 400, "size"),
    ("size-not-multiple-of-16", body(size="40x32"), "application/json", 400, "size"),
    ("size-zero", body(size="0x32"), "application/json", 400, "size"),
    ("n-0", body(n=0), "application/json", 400, "n"),
    ("n-11", body(n=11), "application/json", 400, "n"),
    ("n-negative", body(n=-1), "application/json", 400, "n"),
    ("n-wrong-type", body(n="two"), "application/json", 400, "n"),
    ("steps-0", body(num_inference_steps=0), "application/json", 400, "num_inference_steps"),
    ("guidance-negative", body(guidance_scale=-1), "application/json", 400, "guidance_scale"),
    ("prompt-empty", body(prompt=""), "application/json", 400, "prompt"),
    ("prompt-blank", body(prompt="   "), "application/json", 400, "prompt"),
    ("prompt-wrong-type", body(prompt=5), "application/json", 400, "prompt"),
    ("prompt-1MB", body(prompt="a" * (1 << 20)), "application/json", 400, "prompt"),
    ("prompt-missing", json.dumps(FAST).encode(), "application/json", 400, "prompt"),
    ("response-format-gif", body(response_format="gif"), "application/json", 400, "response_format"),
    ("output-format-bmp", body(output_format="bmp"), "application/json", 400, "output_format"),
    ("background-transparent", body(background="transparent"), "application/json", 400, "background"),
    ("quality-unknown", body(quality="ultra"), "application/json", 400, "quality"),
    ("seed-negative", body(seed=-1), "application/json", 400, "seed"),
    ("unknown-field", body(colour="red"), "application/json", 400, "colour"),
    ("malformed-json", b'{"prompt": "a fox",', "application/json", 400, None),
    ("json-array", b"[]", "application/json", 400, None),
    ("json-null", b"null", "application/json", 400, None),
    ("text-plain", body(), "text/plain", 415, None),
    ("form-urlencoded", b"prompt=a+fox", "application/x-www-form-urlencoded", 415, None),
]


@pytest.mark.parametrize(
    ("content", "content_type", "status", "param"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_REQUESTS],
)
def test_bad_input_gets_its_status_and_the_openai_error_body(
    server: Server, content: bytes, content_type: str, status: int, param: str | None
) -> None:
    error = error_of(post_raw(server, content, content_type), status)
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error
    assert_good_request_succeeds(server)


def test_unknown_model_is_404_model_not_found(server: Server) -> None:
    error = error_of(generate(server, {**GOOD, "model": "gpt-image-1"}), 404)
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    assert_good_request_succeeds(server)


def test_body_over_the_default_16_mib_limit_is_413(server: Server) -> None:
    content = json.dumps({**GOOD, "prompt": "a" * (17 << 20)}).encode()
    error_of(post_raw(server, content, "application/json"), 413)
    assert_good_request_succeeds(server)


def test_no_422_for_odd_bodies(server: Server) -> None:
    odd = [b'"a fox"', b"42", b"{}", body(prompt=None), body(width="wide"), body(size=32), body(n=1.5), b"\xff\xfe"]
    for content in odd:
        response = post_raw(server, content, "application/json")
        error_of(response, 400)
    assert_good_request_succeeds(server)


# --- models, health, routes -------------------------------------------------------------------------------


def check_card(card: dict[str, Any], flux_dir: Path) -> None:
    assert card["object"] == "model"
    assert Path(card["root"]).resolve() == flux_dir.resolve()
    assert (card["task_type"], card["task"]) == ("T2I", "text-to-image")
    assert (card["pipeline_name"], card["pipeline_class"]) == ("flux_pipeline", "FluxPipeline")
    assert card["num_gpus"] == 1
    assert isinstance(card["dit_precision"], str) and card["dit_precision"]
    assert isinstance(card["vae_precision"], str) and card["vae_precision"]
    assert isinstance(card["created"], int) and isinstance(card["owned_by"], str)


def test_v1_models_lists_the_one_served_model(server: Server, flux_dir: Path) -> None:
    response = httpx.get(f"{server.base_url}/v1/models", timeout=10)
    assert response.status_code == 200
    listing = response.json()
    assert listing["object"] == "list"
    (card,) = listing["data"]
    assert card["id"] in {ALIAS, str(flux_dir)}
    check_card(card, flux_dir)


@pytest.mark.parametrize("name", ["path", "alias"])
def test_v1_models_by_path_and_by_alias(server: Server, flux_dir: Path, name: str) -> None:
    model = str(flux_dir) if name == "path" else ALIAS
    response = httpx.get(f"{server.base_url}/v1/models/{model}", timeout=10)
    assert response.status_code == 200, response.text
    card = response.json()
    assert card["id"] == model
    check_card(card, flux_dir)


@pytest.mark.parametrize("model", ["gpt-image-1", "dall-e-2", "tmp/flux1_dev", "dall-e-3/extra"])
def test_v1_models_unknown_is_404_model_not_found(server: Server, model: str) -> None:
    error = error_of(httpx.get(f"{server.base_url}/v1/models/{model}", timeout=10), 404)
    assert error["code"] == "model_not_found"


def test_openai_client_lists_and_retrieves_models(client: OpenAI, flux_dir: Path) -> None:
    (model,) = client.models.list().data
    assert model.id in {ALIAS, str(flux_dir)}
    assert client.models.retrieve(ALIAS).id == ALIAS
    assert client.models.retrieve(str(flux_dir)).id == str(flux_dir)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-image-1")


def test_models_route_has_the_sglang_shape(server: Server, flux_dir: Path) -> None:
    response = httpx.get(f"{server.base_url}/models", timeout=10)
    assert response.status_code == 200
    info = response.json()
    assert set(info) == {
        "model_path", "task_type", "pipeline_name", "pipeline_class", "num_gpus", "dit_precision", "vae_precision",
        "task", "family",
    }  # fmt: skip
    assert info["model_path"] == str(flux_dir)
    assert (info["task_type"], info["task"]) == ("T2I", "text-to-image")
    assert info["pipeline_class"] == "FluxPipeline"
    assert (info["pipeline_name"], info["family"]) == ("flux_pipeline", "flux1")
    assert info["num_gpus"] == 1


def test_health_and_health_generate(server: Server) -> None:
    health = httpx.get(f"{server.base_url}/health", timeout=10)
    assert (health.status_code, health.json()["status"]) == (200, "ok")
    probe = httpx.get(f"{server.base_url}/health_generate", timeout=120)
    assert (probe.status_code, probe.json()["status"]) == (200, "ok")


def test_edits_on_a_text_to_image_model_is_a_400(server: Server) -> None:
    files = {"image": ("fox.png", b"not really a png", "image/png")}
    response = httpx.post(f"{server.base_url}/v1/images/edits", data={"prompt": "a fox"}, files=files, timeout=10)
    error = error_of(response, 400)
    assert "edit" in error["message"]


def test_unknown_route_is_a_404_with_the_openai_body(server: Server) -> None:
    error_of(httpx.get(f"{server.base_url}/v1/no/such/route", timeout=10), 404)
    error_of(httpx.post(f"{server.base_url}/v1/chat/completions", json={}, timeout=10), 404)


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [("GET", "/v1/images/generations", "POST"), ("DELETE", "/v1/models", "GET")],
)
def test_wrong_method_is_405_with_the_openai_body(server: Server, method: str, path: str, allowed: str) -> None:
    response = httpx.request(method, f"{server.base_url}{path}", timeout=10)
    assert allowed in response.headers.get("allow", ""), response.headers
    error_of(response, 405)


def test_unknown_image_ids_and_variants_are_404(server: Server) -> None:
    error_of(httpx.get(f"{server.base_url}/v1/images/img_nope/content?variant=0", timeout=10), 404)
    made = generate(server, {**GOOD, "response_format": "url"})
    assert made.status_code == 200
    (item,) = made.json()["data"]
    assert httpx.get(item["url"], timeout=10).status_code == 200
    error_of(httpx.get(item["url"].replace("variant=0", "variant=1"), timeout=10), 404)


@pytest.mark.parametrize("variant", ["abc", "-1"])
def test_a_malformed_variant_is_400_with_the_openai_body(server: Server, variant: str) -> None:
    response = httpx.get(f"{server.base_url}/v1/images/img_x/content?variant={variant}", timeout=10)
    assert error_of(response, 400)["param"] == "variant"


@pytest.mark.parametrize(
    ("output_format", "content_type", "pil_format"), [("jpeg", "image/jpeg", "JPEG"), ("webp", "image/webp", "WEBP")]
)
def test_output_formats_in_b64_and_url_outputs(
    server: Server, output_format: str, content_type: str, pil_format: str
) -> None:
    for response_format in ("b64_json", "url"):
        made = generate(server, {**GOOD, "output_format": output_format, "response_format": response_format})
        assert made.status_code == 200, made.text[:300]
        (item,) = made.json()["data"]
        if response_format == "url":
            download = httpx.get(item["url"], timeout=10)
            assert download.headers["content-type"] == content_type
            data = download.content
        else:
            data = base64.b64decode(item["b64_json"])
        with Image.open(io.BytesIO(data)) as image:
            assert (image.format, image.size) == (pil_format, (32, 32))


def test_openapi_spec_is_the_checked_in_one(server: Server) -> None:
    from sgl_diffusion import _native

    checked_in = json.loads((Path(__file__).parents[2] / "crates/sgl-http/openapi.json").read_text())
    response = httpx.get(f"{server.base_url}/openapi.json", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == checked_in
    assert json.loads(_native.openapi_json()) == checked_in
    assert "/v1/images/generations" in checked_in["paths"]


def test_cors_is_off_by_default(server: Server) -> None:
    response = httpx.get(f"{server.base_url}/v1/models", headers={"Origin": ORIGIN}, timeout=10)
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


# --- batching and metrics ---------------------------------------------------------------------------------


def test_concurrent_requests_are_batched_and_metrics_show_it(batching_server: Server) -> None:
    client = OpenAI(base_url=f"{batching_server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)

    def one(index: int) -> bytes:
        result = client.images.generate(
            prompt=f"fox number {index}", size="32x32", response_format="b64_json", extra_body=FAST
        )
        (image,) = result.data
        return base64.b64decode(image.b64_json)

    with ThreadPoolExecutor(max_workers=8) as pool:
        images = list(pool.map(one, range(8)))
    assert [png_size(image) for image in images] == [(32, 32)] * 8

    text = batching_server.metrics()
    batches = batching_server.batches_run()
    assert sum(size * count for size, count in batches.items()) == 8, batches
    assert any(size > 1 and count >= 1 for size, count in batches.items()), batches
    ok = metric_value(text, "sgl_diffusion_http_requests_total", '{route="/v1/images/generations",status="200"}')
    assert ok == 8, text
    assert "\nsgl_diffusion_queue_depth 0\n" in text
    assert '\nsgl_diffusion_pipeline_stage_duration_seconds_bucket{stage="denoising",' in text
    assert metric_value(text, "sgl_diffusion_pipeline_stage_duration_seconds_count", '{stage="denoising"}') >= 2
    assert batching_server.metric("sgl_diffusion_device_peak_memory_mb") > 0


def test_cors_allows_the_configured_origin(batching_server: Server) -> None:
    response = httpx.get(f"{batching_server.base_url}/v1/models", headers={"Origin": ORIGIN}, timeout=10)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.get(f"{batching_server.base_url}/v1/models", headers={"Origin": "http://evil.test"}, timeout=10)
    assert "access-control-allow-origin" not in other.headers
    preflight = httpx.options(
        f"{batching_server.base_url}/v1/images/generations",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,authorization",
        },
        timeout=10,
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN


# --- API key, url outputs with expiry, body limit ---------------------------------------------------------

PROTECTED_ROUTES = [
    ("GET", "/v1/models"),
    ("GET", "/models"),
    ("GET", "/v1/models/x"),
    ("POST", "/v1/images/generations"),
    ("POST", "/v1/images/edits"),
    ("GET", "/v1/images/img_x/content?variant=0"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/health_generate"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED_ROUTES, ids=[f"{m} {p}" for m, p in PROTECTED_ROUTES])
@pytest.mark.parametrize(
    "headers",
    [{}, bearer("wrong"), bearer(API_KEY + "x"), {"Authorization": API_KEY}, {"Authorization": f"Basic {API_KEY}"}],
    ids=["no-key", "wrong-key", "longer-key", "no-bearer", "basic"],
)
def test_every_route_but_health_needs_the_key(
    limited_server: Server, method: str, path: str, headers: dict[str, str]
) -> None:
    response = httpx.request(method, f"{limited_server.base_url}{path}", json=GOOD, headers=headers, timeout=10)
    error = error_of(response, 401)
    assert error["type"] == "authentication_error"


def test_health_needs_no_key_and_the_key_opens_the_rest(limited_server: Server) -> None:
    assert httpx.get(f"{limited_server.base_url}/health", timeout=10).status_code == 200
    for path in ("/v1/models", "/models", "/metrics", "/openapi.json"):
        response = httpx.get(f"{limited_server.base_url}{path}", headers=bearer(), timeout=10)
        assert response.status_code == 200, (path, response.text[:300])


def test_openai_client_with_the_key_and_url_downloads(limited_server: Server) -> None:
    client = OpenAI(base_url=f"{limited_server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    (listed,) = client.models.list().data
    assert listed.object == "model"
    b64 = client.images.generate(prompt="a fox", size="32x48", response_format="b64_json", extra_body=FAST)
    assert png_size(base64.b64decode(b64.data[0].b64_json)) == (32, 48)
    result = client.images.generate(prompt="a fox", size="32x48", response_format="url", extra_body=FAST)
    (image,) = result.data
    assert image.url.startswith(f"http://127.0.0.1:{limited_server.port}/v1/images/")
    download = httpx.get(image.url, headers=bearer(), timeout=10)
    assert download.status_code == 200, download.text[:300]
    assert png_size(download.content) == (32, 48)
    error_of(httpx.get(image.url, timeout=10), 401)
    error_of(httpx.get(image.url, headers=bearer("wrong"), timeout=10), 401)
    wrong = OpenAI(base_url=f"{limited_server.base_url}/v1", api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_url_outputs_expire_and_their_files_are_deleted(limited_server: Server, output_dir: Path) -> None:
    response = generate(limited_server, {**GOOD, "response_format": "url"}, bearer())
    created = time.monotonic()
    assert response.status_code == 200, response.text[:300]
    result = response.json()
    (item,) = result["data"]
    download = httpx.get(item["url"], headers=bearer(), timeout=10)
    assert download.status_code == 200
    files = sorted(output_dir.glob(f"{result['id']}*"))
    assert len(files) == 1 and files[0].read_bytes() == download.content
    time.sleep(max(0.0, created + 3 - time.monotonic()))  # the ttl is 2 s
    error_of(httpx.get(item["url"], headers=bearer(), timeout=10), 404)
    # Purged every min(30 s, ttl) = 2 s.
    wait_for(lambda: not files[0].exists(), timeout=10, interval=0.2, what=f"{files[0]} to be deleted")


def test_body_limit_follows_max_body_mb(limited_server: Server) -> None:
    over = json.dumps({**GOOD, "prompt": "a" * (2 << 20)}).encode()
    error_of(post_raw(limited_server, over, "application/json", bearer()), 413)
    # Under 1 MiB as a body, but over the prompt limit.
    under = json.dumps({**GOOD, "prompt": "a" * 1_000_000}).encode()
    assert error_of(post_raw(limited_server, under, "application/json", bearer()), 400)["param"] == "prompt"
    assert_good_request_succeeds(limited_server, bearer())


# --- queue limits and cancellation -------------------------------------------------------------------------


def test_a_full_queue_is_429_with_retry_after(limited_server: Server) -> None:
    server, key = limited_server, bearer()
    with engine_busy(server, key):
        queued = Background(lambda: generate(server, {**GOOD, "prompt": "queued"}, key))
        wait_for(lambda: queue_depth(server, key) == 1, timeout=10, what="the second request to be queued")
        rejected = generate(server, {**GOOD, "prompt": "one too many"}, key)
        error = error_of(rejected, 429)
        assert error["type"] == "rate_limit_error"
        assert int(rejected.headers["retry-after"]) > 0
        assert queued.alive()
    # The busy request was cancelled with its connection; the queued one runs now.
    finished = queued.join()
    assert finished.status_code == 200, finished.text[:300]
    assert_good_request_succeeds(server, key)


def test_a_client_that_goes_away_while_queued_has_its_request_cancelled(limited_server: Server) -> None:
    # Every step waits for an event the server reports (a batch started, the queue depth), never for
    # "it will still be running"; the client goes away by closing its socket, not by a timeout racing
    # the engine.
    server, key = limited_server, bearer()
    before = batches_started(server, key)
    with engine_busy(server, key) as busy:
        with raw_request(server, {**GOOD, "prompt": "impatient"}, key):
            wait_for(lambda: queue_depth(server, key) == 1, timeout=30, what="the impatient request to be queued")
        # The impatient client has gone away: its request leaves the queue at once ...
        wait_for(lambda: queue_depth(server, key) == 0, timeout=10, what="the abandoned request to leave the queue")
        # ... cancelled, not run: the busy request still holds the engine (it has not answered) and no
        # other batch has started.
        assert not answered(busy), "the busy request finished early; make it longer"
        assert batches_started(server, key) == before + 1, server.batches_run(key)
    # Leaving the block cancelled the busy request too: the engine serves the next one.
    assert_good_request_succeeds(server, key)
    # The busy request and the good one ran; the abandoned one never did.
    assert batches_started(server, key) - before == 2, server.batches_run(key)


# --- graceful shutdown -------------------------------------------------------------------------------------


def test_sigterm_finishes_the_running_request_then_exits_0(doomed_server: Server) -> None:
    server = doomed_server
    started = batches_started(server)
    running = Background(lambda: generate(server, {**GOOD, "num_inference_steps": SLOW_STEPS}))
    wait_for(lambda: batches_started(server) > started, timeout=30, what="the slow request to run")
    server.proc.send_signal(signal.SIGTERM)
    wait_for(
        lambda: httpx.get(f"{server.base_url}/health", timeout=5).status_code == 503,
        timeout=10,
        what="/health to answer 503 while shutting down",
    )
    assert running.alive(), "the slow request finished before the shutdown began; raise SLOW_STEPS"
    # Still listening while the running request finishes, but taking no new work.
    assert httpx.get(f"{server.base_url}/health", timeout=5).json()["status"] == "shutting_down"
    error_of(generate(server, GOOD, timeout=10), 503)
    finished = running.join()
    assert finished.status_code == 200, finished.text[:300]
    (item,) = finished.json()["data"]
    assert png_size(base64.b64decode(item["b64_json"])) == (32, 32)
    assert server.proc.wait(timeout=60) == 0, server.log()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.base_url}/health", timeout=5)
    assert "shutting down" in server.log()


def test_serve_without_a_model_path_serves_the_builtin_model(tmp_path: Path) -> None:
    import os
    import subprocess

    from server_util import SGL_DIFFUSION, free_port

    assert SGL_DIFFUSION is not None
    port = free_port()
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [SGL_DIFFUSION, "serve", "--device", "cpu", "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "SGL_DIFFUSION_CACHE": str(tmp_path / "cache")},
        )
    server = Server(proc=proc, port=port, log_path=log_path).wait_ready()
    try:
        card = httpx.get(f"{server.base_url}/v1/models").json()["data"][0]
        assert "tiny-flux1-random" in card["root"] and card["pipeline_class"] == "FluxPipeline"
        body = {"prompt": "a lighthouse", "size": "64x64", "num_inference_steps": 2}
        response = httpx.post(f"{server.base_url}/v1/images/generations", json=body, timeout=120)
        assert response.status_code == 200, response.text
        image = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
        assert image.size == (64, 64)
    finally:
        assert server.stop() == 0
