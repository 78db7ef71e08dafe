"""Admission by cost, deadlines, logs with request ids, and honest health, against real server processes
(CPU, the tiny FLUX.1 fixture) and through the Python API and CLI that share the same scheduler.

The tiny fixture's defaults are 1024x1024 in 28 steps (4 096 latent tokens of 16x16 pixels), so the
default budgets are 10 x 4 096 x 28 = 1 146 880 token-steps and 10 x 1024 x 1024 = 10 485 760 output pixels.

Requests meant to outlast a deadline or a stall timeout are sized from step times measured on the
fixture (Python API, fp32, an idle 2-core x86 CPU): a step takes 2 ms at 32x32, 3 ms at 256x256, 10 ms
at 512x512, 61 ms at 1024x1024, 330 ms at 1536x1536 and ~1 s at 2048x2048; a 1-step 2048x2048 request
spends ~4 s decoding and encoding after its step, a 2-output one ~9 s. Steps are capped at 1000, so
only a bigger size makes such a request long enough on a fast machine; a deadline stops it between two
steps, so it costs the test only its deadline plus one step."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from server_util import SGL_DIFFUSION, Server, metric_value, running_servers, wait_for

#: A valid request that runs well under a second on CPU.
GOOD = {"prompt": "a red fox", "size": "32x32", "num_inference_steps": 2, "max_sequence_length": 16}
#: ~41 s on an idle CPU (124 steps of ~330 ms), with progress after every step: 20x and more the deadlines
#: below, and a step short enough for a deadline to stop it promptly on a loaded machine. 9 216 tokens x
#: 124 steps = 1 142 784 token-steps, within the default budget.
SLOW_SIDE, SLOW_STEPS = 1536, 124
SLOW = {**GOOD, "size": f"{SLOW_SIDE}x{SLOW_SIDE}", "num_inference_steps": SLOW_STEPS}
SLOW_COST = (SLOW_SIDE // 16) ** 2 * SLOW_STEPS
#: The audit's request: 10 images of 2048x2048 in 1000 steps (~21 h on a CPU).
HUGE = {**GOOD, "n": 10, "size": "2048x2048", "num_inference_steps": 1000}
HUGE_COST = 10 * (2048 // 16) ** 2 * 1000
DEFAULT_BUDGET = 10 * (1024 // 16) ** 2 * 28
#: The audit's other request: 10 images of 2048x2048 in 1 step. Little denoising (163 840 token-steps), but 42
#: megapixels to decode, encode and send (190 s on a CPU, 2.6 GB of memory and a 64 MB answer).
WIDE = {**GOOD, "n": 10, "size": "2048x2048", "num_inference_steps": 1}
WIDE_PIXELS = 10 * 2048 * 2048
DEFAULT_PIXEL_BUDGET = 10 * 1024 * 1024
JSON_BUDGET = 2_000_000
JSON_PIXEL_BUDGET = 5_000_000
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
READY_TIMEOUT = 300


def generate(server: Server, body: dict[str, Any], headers: dict[str, str] | None = None, timeout: float = 120):
    return httpx.post(f"{server.base_url}/v1/images/generations", json=body, headers=headers or {}, timeout=timeout)


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text[:500])
    return response.json()["error"]


def batches_started(server: Server) -> int:
    return sum(server.batches_run().values())


def queue_depth(server: Server) -> float:
    return metric_value(server.metrics(), "sgl_diffusion_queue_depth")


class Background:
    """One call on a thread, its result or exception kept for `join`."""

    def __init__(self, call: Any) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call: Any) -> None:
        try:
            self.result = call()
        except BaseException as err:  # noqa: BLE001 - re-raised by join()
            self.error = err

    def join(self, timeout: float = 120) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the background call did not finish"
        if self.error is not None:
            raise self.error
        return self.result


@contextmanager
def engine_busy(server: Server) -> Iterator[None]:
    """A SLOW request on a raw socket, running inside the block; closing the socket cancels it."""
    started = batches_started(server)
    payload = json.dumps({**SLOW, "prompt": "keeps the engine busy"}).encode()
    head = f"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
    head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head.encode() + payload)
        wait_for(lambda: batches_started(server) > started, timeout=30, what="the busy request to run")
        yield


def json_lines(log: str) -> list[dict[str, Any]]:
    lines = []
    for line in log.splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


# --- servers ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers(request: pytest.FixtureRequest, flux_dir: Path) -> Iterator[dict[str, Server]]:
    flags = {
        # Defaults, but one request running and one waiting.
        "server": ["--max-queue-size", "1"],
        # JSON logs, warnings only; budgets of 2 000 000 token-steps (SLOW fits, twice SLOW does not) and
        # 5 000 000 output pixels (twice SLOW fits, two 2048x2048 images do not), and a 2 s deadline for
        # every request.
        "json_server": [
            *("--log-format", "json", "--request-timeout", "2"),
            *("--max-request-cost", str(JSON_BUDGET), "--max-request-pixels", str(JSON_PIXEL_BUDGET)),
        ],
        # /health fails after 1 s without progress.
        "stalling_server": ["--stall-timeout", "1"],
    }
    selected = [item for item in request.session.items if getattr(item, "module", None) is request.module]
    wanted = {name for item in selected for name in getattr(item, "fixturenames", ())}
    launched_flags = {name: extra for name, extra in flags.items() if name in wanted}
    with running_servers(flux_dir, launched_flags, env={"SGL_DIFFUSION_LOG": "info"}) as launched:
        yield launched


@pytest.fixture(scope="module")
def server(servers: dict[str, Server]) -> Server:
    return servers["server"].wait_ready(READY_TIMEOUT)


@pytest.fixture(scope="module")
def json_server(servers: dict[str, Server]) -> Server:
    return servers["json_server"].wait_ready(READY_TIMEOUT)


@pytest.fixture(scope="module")
def stalling_server(servers: dict[str, Server]) -> Server:
    return servers["stalling_server"].wait_ready(READY_TIMEOUT)


# --- admission by cost ------------------------------------------------------------------------------------


def test_a_request_over_the_default_budget_is_a_400_naming_the_budget_and_its_cost(server: Server) -> None:
    # Before admission by cost this request was queued and held the server for hours.
    started = time.monotonic()
    error = error_of(generate(server, HUGE, timeout=30), 400)
    assert time.monotonic() - started < 10
    assert error["code"] == "request_over_budget" and error["param"] is None, error
    assert f"{HUGE_COST} token-steps" in error["message"], error
    assert str(DEFAULT_BUDGET) in error["message"] and "--max-request-cost" in error["message"], error
    # The model's own defaults, ten times over, fit: n=10 of 1024x1024 in 2 steps (not run here: slow on CPU),
    # and small requests run.
    assert generate(server, GOOD).status_code == 200


def test_a_request_over_the_default_pixel_budget_is_a_400_naming_its_pixels(server: Server) -> None:
    # Before the pixel budget this request was admitted: its denoising is cheap, its decode is not.
    started = time.monotonic()
    error = error_of(generate(server, WIDE, timeout=30), 400)
    assert time.monotonic() - started < 10
    assert error["code"] == "request_over_budget" and error["param"] is None, error
    assert f"{WIDE_PIXELS} output pixels (10 outputs × 2048×2048 pixels × 1 frames)" in error["message"], error
    assert f"budget of {DEFAULT_PIXEL_BUDGET} output pixels" in error["message"], error
    assert "--max-request-pixels" in error["message"] and "--max-request-cost" not in error["message"], error


def test_max_request_cost_sets_the_budget(json_server: Server) -> None:
    # 32x32 is 4 tokens: 4 images in 2 steps are 32 token-steps; 2 SLOW ones are 2 285 568, over 2 000 000
    # (one SLOW request, within it, runs in the deadline tests below).
    assert generate(json_server, {**GOOD, "n": 4}).status_code == 200
    error = error_of(generate(json_server, {**SLOW, "n": 2}), 400)
    assert f"{2 * SLOW_COST} token-steps" in error["message"], error
    assert f"budget of {JSON_BUDGET} token-steps" in error["message"], error
    assert "--max-request-pixels" not in error["message"], error


def test_max_request_pixels_sets_the_pixel_budget(json_server: Server) -> None:
    # Two 2048x2048 images in 1 step: 8 388 608 pixels, within the default budget but over this server's.
    error = error_of(generate(json_server, {**GOOD, "n": 2, "size": "2048x2048", "num_inference_steps": 1}), 400)
    assert error["code"] == "request_over_budget", error
    assert "8388608 output pixels (2 outputs × 2048×2048 pixels × 1 frames)" in error["message"], error
    assert f"budget of {JSON_PIXEL_BUDGET} output pixels per request (--max-request-pixels)" in error["message"]
    # The start-up line states both limits.
    admission = f"at most {JSON_BUDGET} token-steps and {JSON_PIXEL_BUDGET} output pixels per request"
    assert any(admission in line["fields"]["message"] for line in json_lines(json_server.log())), json_server.log()


def test_the_budget_options_reach_the_engine_and_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    # `serve` and the native binary parse their flags here (`generate` shares the option group).
    from sgl_diffusion.cli import serve

    engine = json.loads(serve.parse_serve_config(["--max-request-cost", "7", "--max-request-pixels", "5000"]))["engine"]
    assert (engine["max_request_cost"], engine["max_request_pixels"]) == (7, 5000)
    for flag in ("--max-request-cost", "--max-request-pixels"):
        with pytest.raises(SystemExit):
            serve.parse_serve_config([flag, "0"])
        assert f"{flag} must be at least 1" in capsys.readouterr().err


def test_the_python_api_and_the_cli_apply_the_same_budget(generator: Any, flux_dir: Path, tmp_path: Path) -> None:
    from sgl_diffusion import DiffGenerator, InvalidRequestError

    with pytest.raises(InvalidRequestError, match=f"{HUGE_COST} token-steps.*budget of {DEFAULT_BUDGET}"):
        generator.generate("a fox", height=2048, width=2048, num_inference_steps=1000, num_outputs_per_prompt=10)
    pixels = f"{WIDE_PIXELS} output pixels.*budget of {DEFAULT_PIXEL_BUDGET} output pixels.*--max-request-pixels"
    with pytest.raises(InvalidRequestError, match=pixels):
        generator.generate("a fox", height=2048, width=2048, num_inference_steps=1, num_outputs_per_prompt=10)
    # 4 images of 32x32 are 4096 pixels.
    small = DiffGenerator.from_pretrained(flux_dir, device="cpu", max_request_pixels=3000)
    try:
        with pytest.raises(InvalidRequestError, match="4096 output pixels.*budget of 3000 output pixels"):
            small.generate("a fox", height=32, width=32, num_inference_steps=1, num_outputs_per_prompt=4)
    finally:
        small.shutdown()
    assert SGL_DIFFUSION is not None
    out = tmp_path / "out"
    command = [
        SGL_DIFFUSION, "generate", "--model-path", str(flux_dir), "--device", "cpu", "--prompt", "a fox",
        "--height", "32", "--width", "32", "--num-inference-steps", "30", "--num-outputs-per-prompt", "4",
        "--output-path", str(out),
    ]  # fmt: skip
    done = subprocess.run(
        [*command, "--max-request-cost", "100"], check=False, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "480 token-steps" in done.stderr and "budget of 100" in done.stderr, done.stderr[-2000:]
    assert not out.exists() or not any(out.iterdir())
    # The pixel budget from a --config file (every option's config key works there too): 4 images of 32x32.
    config = tmp_path / "limits.yaml"
    config.write_text("max_request_pixels: 3000\n")
    done = subprocess.run([*command, "--config", str(config)], check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "4096 output pixels" in done.stderr and "budget of 3000 output pixels" in done.stderr, done.stderr[-2000:]
    assert not out.exists() or not any(out.iterdir())


# --- deadlines --------------------------------------------------------------------------------------------


def test_a_running_request_past_its_timeout_is_stopped_with_504(server: Server) -> None:
    started = time.monotonic()
    response = generate(server, {**SLOW, "timeout_seconds": 1}, headers={"x-request-id": "slow-one"})
    error = error_of(response, 504)
    assert error["code"] == "deadline_exceeded" and "1.000 s" in error["message"], error
    assert time.monotonic() - started < 15
    assert response.headers["x-request-id"] == "slow-one"
    # The warning reached the server's stderr, naming the request.
    wait_for(lambda: "slow-one" in server.log(), timeout=5, what="the deadline warning in the log")
    line = next(line for line in server.log().splitlines() if "passed its deadline" in line and "slow-one" in line)
    assert "WARN" in line, line
    assert generate(server, GOOD).status_code == 200


def test_a_queued_request_is_answered_at_its_deadline_while_the_engine_is_busy(server: Server) -> None:
    with engine_busy(server):
        started = time.monotonic()
        error = error_of(generate(server, {**GOOD, "timeout_seconds": 1}, timeout=30), 504)
        assert time.monotonic() - started < 5, "answered only when the busy request ended"
        assert error["code"] == "deadline_exceeded"
        assert queue_depth(server) == 0


def test_request_timeout_is_the_server_wide_deadline(json_server: Server) -> None:
    # SLOW runs ~20x the server's 2 s; it is answered at the deadline, not when it would have ended.
    started = time.monotonic()
    error = error_of(generate(json_server, SLOW), 504)
    assert "2.000 s" in error["message"], error
    # A request may ask for less than the server's deadline, not more.
    error = error_of(generate(json_server, {**SLOW, "timeout_seconds": 60}), 504)
    assert "2.000 s" in error["message"], error
    assert time.monotonic() - started < 30
    assert error_of(generate(json_server, {**GOOD, "timeout_seconds": 0}), 400)["param"] == "timeout_seconds"


def test_the_python_api_raises_deadline_exceeded(generator: Any) -> None:
    from sgl_diffusion import DeadlineExceededError

    started = time.monotonic()
    with pytest.raises(DeadlineExceededError, match="deadline of 0.500 s"):
        generator.generate(
            "a fox", height=SLOW_SIDE, width=SLOW_SIDE, num_inference_steps=SLOW_STEPS, timeout_seconds=0.5
        )
    assert time.monotonic() - started < 10


# --- request ids and logs ---------------------------------------------------------------------------------


def test_responses_carry_the_request_id_given_or_a_generated_one(server: Server) -> None:
    given = generate(server, GOOD, headers={"x-request-id": "client-42"})
    assert given.status_code == 200 and given.headers["x-request-id"] == "client-42"
    generated = generate(server, GOOD)
    assert UUID.match(generated.headers["x-request-id"]), generated.headers
    # Errors and unknown routes too; an unusable id (too long) is replaced, not echoed.
    bad = generate(server, {**GOOD, "size": "7x7"}, headers={"x-request-id": "bad-request"})
    assert bad.status_code == 400 and bad.headers["x-request-id"] == "bad-request"
    missing = httpx.get(f"{server.base_url}/no/such/route", headers={"x-request-id": "x" * 500}, timeout=10)
    assert missing.status_code == 404 and UUID.match(missing.headers["x-request-id"]), missing.headers
    # The access log line names the request.
    wait_for(lambda: "client-42" in server.log(), timeout=5, what="the access log line")
    access = [line for line in server.log().splitlines() if "client-42" in line and "finished processing" in line]
    assert access and "status=200" in access[0], server.log()[-3000:]


def test_json_logs_carry_the_request_id_and_follow_the_env_filter(json_server: Server) -> None:
    error_of(generate(json_server, SLOW, headers={"x-request-id": "json-7"}), 504)

    def deadline_line() -> dict[str, Any] | None:
        for line in json_lines(json_server.log()):
            if line["fields"].get("request_id") == "json-7" and line["level"] == "WARN":
                return line
        return None

    wait_for(deadline_line, timeout=5, what="the JSON deadline warning")
    line = deadline_line()
    assert line is not None and "deadline" in line["fields"]["message"], line
    access = [
        entry
        for entry in json_lines(json_server.log())
        if entry.get("span", {}).get("request_id") == "json-7" and "finished processing" in entry["fields"]["message"]
    ]
    assert access and access[0]["fields"]["status"] == 504, access
    assert any(
        entry["target"].startswith("sgl_http") and "listening on" in entry["fields"]["message"]
        for entry in json_lines(json_server.log())
    ), json_server.log()[-3000:]


def test_the_log_filter_comes_from_the_environment(flux_dir: Path) -> None:
    with running_servers(flux_dir, {"quiet": []}, env={"SGL_DIFFUSION_LOG": "warn"}) as launched:
        quiet = launched["quiet"].wait_ready(READY_TIMEOUT)
        error_of(generate(quiet, {**SLOW, "timeout_seconds": 0.5}), 504)
        wait_for(lambda: "passed its deadline" in quiet.log(), timeout=5, what="the warning")
        assert "listening on" not in quiet.log() and "finished processing" not in quiet.log(), quiet.log()


# --- health -----------------------------------------------------------------------------------------------


def test_a_full_queue_is_a_busy_server_not_an_unhealthy_one(server: Server) -> None:
    with engine_busy(server):
        queued = Background(lambda: generate(server, {**GOOD, "prompt": "queued"}))
        wait_for(lambda: queue_depth(server) == 1, timeout=10, what="the queue to fill")
        error_of(generate(server, GOOD), 429)
        # Before, the readiness probe queued behind user work: a full queue read as 503 unhealthy.
        ready = httpx.get(f"{server.base_url}/health_generate", timeout=10)
        assert ready.status_code == 200, ready.text
        assert ready.json()["status"] in ("busy", "ok"), ready.json()
        assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
    assert queued.join().status_code == 200
    ready = httpx.get(f"{server.base_url}/health_generate", timeout=60)
    assert ready.status_code == 200 and ready.json()["status"] == "ok", ready.text


def test_an_executor_without_progress_fails_liveness_and_recovers(stalling_server: Server) -> None:
    server = stalling_server
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
    # Progress is a batch starting or ending, or a denoising step finishing. Two 2048x2048 outputs in one
    # step: ~2 s to the step, then ~9 s decoding and encoding with no step to finish (on an idle CPU). To
    # /health, with --stall-timeout 1, that is what a hung kernel looks like. Within the default budgets.
    stuck = Background(lambda: generate(server, {**GOOD, "n": 2, "size": "2048x2048", "num_inference_steps": 1}))

    def unhealthy() -> bool:
        return httpx.get(f"{server.base_url}/health", timeout=10).status_code == 503

    wait_for(unhealthy, timeout=30, interval=0.2, what="/health to answer 503")
    body = httpx.get(f"{server.base_url}/health", timeout=10).json()
    if body["status"] == "stalled":  # the request may have finished between the two calls
        assert "--stall-timeout 1 s" in body["detail"], body
    ready = httpx.get(f"{server.base_url}/health_generate", timeout=10)
    assert ready.status_code in (200, 503)
    assert stuck.join().status_code == 200
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200
    # The error was logged to stderr.
    assert "made no progress" in server.log() and "ERROR" in server.log(), server.log()[-3000:]


def test_only_sticky_cuda_errors_count_as_device_failures() -> None:
    import torch

    from sgl_diffusion.runtime.executor import is_unrecoverable_device_error

    assert is_unrecoverable_device_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert is_unrecoverable_device_error(RuntimeError("CUDA error: device-side assert triggered"))
    assert not is_unrecoverable_device_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert not is_unrecoverable_device_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
