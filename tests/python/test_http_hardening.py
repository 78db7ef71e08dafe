"""The server's edge under hostile clients (issue 11): real `sgl-diffusion serve` processes on the tiny
FLUX.1 and Wan2.1 fixtures, spoken to over raw sockets where a well-behaved HTTP client would not do what
an attacker does (declare a 100 GiB body, stream 1 GiB, send headers a byte at a time, hold connections).

Memory is measured on the server process itself (`VmRSS` in /proc/<pid>/status)."""

from __future__ import annotations

import json
import select
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any, Self

import httpx2 as httpx
import pytest

from server_util import Server, running_servers, wait_for
from sgl_diffusion.errors import InvalidRequestError

READY_TIMEOUT = 300
ERROR_FIELDS = {"message", "type", "param", "code"}
API_KEY = "secret"
#: `--header-read-timeout` and `--body-read-timeout` of the tight server, in seconds.
TIGHT_TIMEOUT = 2
#: `--max-connections` of the tight server.
TIGHT_CONNECTIONS = 4
#: Most the server's resident memory may grow while it refuses a 1 GiB upload (the body limit is 16 MiB).
RSS_GROWTH_BOUND = 200 << 20
GOOD = {"prompt": "a red fox", "size": "32x32", "num_inference_steps": 2, "max_sequence_length": 16}


# --- servers -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sgl_diffusion.testing import build_fixture

    return build_fixture("wan21_t2v", tmp_path_factory.mktemp("models") / "wan21_t2v")


@pytest.fixture(scope="module")
def wan_i2v_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sgl_diffusion.testing import build_fixture

    return build_fixture("wan21_i2v", tmp_path_factory.mktemp("models") / "wan21_i2v")


@pytest.fixture(scope="module")
def servers(
    request: pytest.FixtureRequest, flux_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Server]]:
    """Every server the selected tests use, started at once so that they load in parallel."""
    selected = [item for item in request.session.items if getattr(item, "module", None) is request.module]
    wanted = {name for item in selected for name in getattr(item, "fixturenames", ())}
    image_flags = {
        # Every default: 16 MiB bodies, 10 s header and 60 s body timeouts, 512 connections.
        "server": [],
        # Short timeouts, few connections, a key, and CORS for any origin.
        "tight_server": [
            *("--header-read-timeout", str(TIGHT_TIMEOUT), "--body-read-timeout", str(TIGHT_TIMEOUT)),
            *("--max-connections", str(TIGHT_CONNECTIONS), "--api-key", API_KEY, "--cors-origin", "*"),
        ],
    }
    with ExitStack() as stack:
        launched = stack.enter_context(
            running_servers(flux_dir, {name: flags for name, flags in image_flags.items() if name in wanted})
        )
        if "video_server" in wanted:
            video = {"video_server": ["--output-dir", str(tmp_path_factory.mktemp("video_server"))]}
            launched = {**launched, **stack.enter_context(running_servers(request.getfixturevalue("wan_dir"), video))}
        if "bomb_server" in wanted:
            # Lets any image past the HTTP check, so that the pipeline meets the decompression bomb.
            bomb = {
                "bomb_server": [
                    "--output-dir",
                    str(tmp_path_factory.mktemp("bomb")),
                    "--max-input-pixels",
                    "10000000000",
                ]
            }
            i2v_dir = request.getfixturevalue("wan_i2v_dir")
            launched = {**launched, **stack.enter_context(running_servers(i2v_dir, bomb))}
        yield launched


@pytest.fixture(scope="module")
def server(servers: dict[str, Server]) -> Server:
    return servers["server"].wait_ready(READY_TIMEOUT)


@pytest.fixture(scope="module")
def tight_server(servers: dict[str, Server]) -> Server:
    return servers["tight_server"].wait_ready(READY_TIMEOUT)


@pytest.fixture(scope="module")
def video_server(servers: dict[str, Server]) -> Server:
    return servers["video_server"].wait_ready(READY_TIMEOUT)


@pytest.fixture(scope="module")
def bomb_server(servers: dict[str, Server]) -> Server:
    return servers["bomb_server"].wait_ready(READY_TIMEOUT)


# --- helpers -----------------------------------------------------------------------------------------------


def error_of(status: int, body: bytes | str, expected: int) -> dict[str, Any]:
    """Checks the status and the OpenAI error body; returns its `error` object."""
    assert status == expected, (status, body[:500])
    parsed = json.loads(body)
    assert set(parsed) == {"error"} and set(parsed["error"]) == ERROR_FIELDS, parsed
    return parsed["error"]


def connect(server: Server, timeout: float = 10) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=timeout)


def read_response(sock: socket.socket, timeout: float) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response (status, lower-cased headers, body with a Content-Length); fails if none
    arrives within `timeout` seconds."""
    sock.settimeout(timeout)
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise AssertionError(f"the connection closed without a response: {data!r}")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    except TimeoutError as err:
        raise AssertionError(f"no response within {timeout} s (got {data[:200]!r})") from err
    return status, headers, body


def rss(pid: int) -> int:
    """Resident memory of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


class PeakRss:
    """Samples a process's resident memory every few milliseconds in the background."""

    def __init__(self, pid: int) -> None:
        self.pid, self.start, self.peak = pid, rss(pid), 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss(self.pid))
            time.sleep(0.005)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.5)  # a buffer freed right after the response is still counted
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.start


def png(width: int, height: int) -> bytes:
    """A small PNG file that declares `width` x `height` pixels (a decompression bomb when large):
    a valid header, then an image stream that ends early."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def chunked(data: bytes) -> bytes:
    """One chunk of a `Transfer-Encoding: chunked` body."""
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


# --- body limits, and what is checked before a body is read ---------------------------------------------


def test_a_declared_100_gib_body_is_refused_at_once(server: Server) -> None:
    for path, content_type in [
        ("/v1/images/generations", "application/json"),
        ("/v1/videos", "multipart/form-data; boundary=b"),
    ]:
        with closing(connect(server)) as sock:
            started = time.monotonic()
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {100 << 30}\r\n\r\n".encode()
            )
            status, _, body = read_response(sock, timeout=5)
            assert time.monotonic() - started < 2
        assert "--max-body-mb" in error_of(status, body, 413)["message"]
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200


def test_a_1_gib_streamed_multipart_field_is_refused_with_bounded_memory(video_server: Server) -> None:
    """Sent without a Content-Length, so only reading it can tell its size: the server must stop at the
    16 MiB limit instead of holding the field whole (it used to: RSS +1 GB, then 413)."""
    # A text field (this text-to-video model would refuse an `input_reference` part on sight).
    head = (
        b'--b\r\nContent-Disposition: form-data; name="prompt"\r\n\r\na paper boat\r\n'
        b'--b\r\nContent-Disposition: form-data; name="negative_prompt"\r\n\r\n'
    )
    block = b"\0" * (1 << 20)
    sent, response = 0, None
    with PeakRss(video_server.proc.pid) as memory, closing(connect(video_server)) as sock:
        sock.sendall(
            b"POST /v1/videos HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n" + chunked(head)
        )
        try:
            while sent < 1 << 30:
                if select.select([sock], [], [], 0)[0]:
                    break  # the answer came early
                sock.sendall(chunked(block))
                sent += len(block)
            else:  # all of it went: end the form and the body
                sock.sendall(chunked(b"\r\n--b--\r\n") + b"0\r\n\r\n")
            response = read_response(sock, timeout=30)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused and closed while we were still sending; the metrics say with what
    assert memory.growth < RSS_GROWTH_BOUND, f"RSS grew by {memory.growth >> 20} MiB"
    assert sent < 1 << 29, f"the server read {sent >> 20} MiB of a refused upload"
    if response is not None:
        error_of(response[0], response[2], 413)
    refused = video_server.metric("sgl_diffusion_http_requests_total", '{route="/v1/videos",status="413"}')
    assert refused >= 1
    assert httpx.get(f"{video_server.base_url}/health", timeout=10).status_code == 200


def test_videos_on_an_image_model_are_refused_before_the_body_is_read(server: Server) -> None:
    with closing(connect(server)) as sock:
        sock.sendall(
            b"POST /v1/videos HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n"
        )  # ... and the rest of the body never comes
        status, _, body = read_response(sock, timeout=5)
    error = error_of(status, body, 400)
    assert error["param"] == "model" and "makes images" in error["message"], error


# --- connections and timeouts ----------------------------------------------------------------------------


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed the connection (whatever it sent before)."""
    if not select.select([sock], [], [], 0)[0]:
        return False
    try:
        while sock.recv(65536):
            if not select.select([sock], [], [], 0)[0]:
                return False
    except OSError:
        return True
    return True


def test_slow_loris_connections_are_closed_after_the_header_timeout(tight_server: Server) -> None:
    request = b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 1000
    with ExitStack() as stack:
        socks = [stack.enter_context(closing(connect(tight_server))) for _ in range(TIGHT_CONNECTIONS - 1)]
        started = time.monotonic()
        closed_after: dict[int, float] = {}
        for byte in range(len(request)):
            for index, sock in enumerate(socks):
                if index in closed_after:
                    continue
                try:
                    sock.send(request[byte : byte + 1])
                except OSError:
                    closed_after[index] = time.monotonic() - started
                    continue
                if closed_by_server(sock):
                    closed_after[index] = time.monotonic() - started
            if len(closed_after) == len(socks) or time.monotonic() - started > 4 * TIGHT_TIMEOUT:
                break
            # Meanwhile the server answers others (one slot is left free).
            if byte == 5:
                assert httpx.get(f"{tight_server.base_url}/health", timeout=5).status_code == 200
            time.sleep(0.1)
    assert sorted(closed_after) == list(range(len(socks))), f"still open after {4 * TIGHT_TIMEOUT} s: {closed_after}"
    assert all(TIGHT_TIMEOUT - 0.5 < after < TIGHT_TIMEOUT + 2 for after in closed_after.values()), closed_after


def test_connections_over_the_cap_wait_for_a_free_slot(tight_server: Server) -> None:
    """`--max-connections 4`: four silent connections fill every slot; a fifth client waits (it is not
    accepted) until the header timeout frees one, and is then answered."""
    with ExitStack() as stack:
        for _ in range(TIGHT_CONNECTIONS):
            stack.enter_context(closing(connect(tight_server)))
        time.sleep(0.3)
        started = time.monotonic()
        response = httpx.get(f"{tight_server.base_url}/health", timeout=10 * TIGHT_TIMEOUT)
        waited = time.monotonic() - started
    assert response.status_code == 200
    assert TIGHT_TIMEOUT / 2 < waited < 3 * TIGHT_TIMEOUT, f"answered after {waited:.2f} s"
    # Slots free again: answered at once.
    started = time.monotonic()
    assert httpx.get(f"{tight_server.base_url}/health", timeout=10).status_code == 200
    assert time.monotonic() - started < 1


def test_a_body_that_stops_arriving_is_408_after_the_body_read_timeout(tight_server: Server) -> None:
    with closing(connect(tight_server)) as sock:
        started = time.monotonic()
        sock.sendall(
            f"POST /v1/images/generations HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {API_KEY}\r\n"
            'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"prompt": '.encode()
        )
        status, _, body = read_response(sock, timeout=4 * TIGHT_TIMEOUT)
        waited = time.monotonic() - started
    assert error_of(status, body, 408)["code"] == "request_timeout"
    assert TIGHT_TIMEOUT - 0.5 < waited < TIGHT_TIMEOUT + 2, waited


# --- auth and CORS ---------------------------------------------------------------------------------------


def test_cors_origin_star_allows_any_origin_and_options_needs_the_key(tight_server: Server) -> None:
    preflight = httpx.options(
        f"{tight_server.base_url}/v1/images/generations",
        headers={"Origin": "http://anywhere.example", "Access-Control-Request-Method": "POST"},
        timeout=10,
    )
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"
    # Not a preflight: the key is needed, and an existing route looks like a missing one.
    for path in ("/v1/videos", "/v1/no-such-route"):
        response = httpx.options(f"{tight_server.base_url}{path}", timeout=10)
        error_of(response.status_code, response.content, 401)
    models = httpx.get(f"{tight_server.base_url}/v1/models", headers={"Authorization": f"bearer {API_KEY}"}, timeout=10)
    assert models.status_code == 200, models.text[:300]


# --- parsing and error bodies ---------------------------------------------------------------------------


def post_images(
    server: Server, content: bytes, content_type: str = "application/json", **headers: str
) -> httpx.Response:
    return httpx.post(
        f"{server.base_url}/v1/images/generations",
        content=content,
        headers={"Content-Type": content_type, **headers},
        timeout=120,
    )


def test_one_json_value_of_type_application_json_is_a_body(server: Server) -> None:
    good = json.dumps(GOOD).encode()
    response = post_images(server, good + b" {}")
    assert "trailing" in error_of(response.status_code, response.content, 400)["message"]
    response = post_images(server, good, "application/jsonp")
    error_of(response.status_code, response.content, 415)
    assert post_images(server, good, "application/json; charset=utf-8").status_code == 200


def test_a_megabyte_value_gets_a_short_error(server: Server) -> None:
    for field in ("width", "size", "output_format"):
        response = post_images(server, json.dumps({**GOOD, field: "9" * (1 << 20)}).encode())
        error = error_of(response.status_code, response.content, 400)
        assert len(response.content) < 2000, (field, len(response.content))
        assert error["param"] in (field, "size"), error


def test_url_outputs_need_a_valid_host(server: Server) -> None:
    body = json.dumps({**GOOD, "response_format": "url"}).encode()
    for host in ("evil.example/phish?x=", "user@evil.example"):
        response = post_images(server, body, Host=host)
        assert "--public-url" in error_of(response.status_code, response.content, 400)["message"]
    response = post_images(server, body, Host=f"localhost:{server.port}")
    assert response.status_code == 200, response.text[:300]
    assert response.json()["data"][0]["url"].startswith(f"http://localhost:{server.port}/v1/images/")


def test_seconds_beyond_the_model_are_a_400_naming_seconds(video_server: Server) -> None:
    for seconds in (1e10, "1e10", 1e300):
        response = httpx.post(
            f"{video_server.base_url}/v1/videos", json={"prompt": "a kite", "seconds": seconds, "fps": 16}, timeout=30
        )
        error = error_of(response.status_code, response.content, 400)
        assert error["param"] == "seconds" and "at most" in error["message"], error


def test_an_unknown_after_cursor_is_a_400_naming_after(video_server: Server) -> None:
    response = httpx.get(f"{video_server.base_url}/v1/videos", params={"after": "video_gone"}, timeout=30)
    assert error_of(response.status_code, response.content, 400)["param"] == "after"


# --- decompression bombs --------------------------------------------------------------------------------


@pytest.mark.parametrize("side", [12_000, 20_000], ids=["warned-by-pil", "refused-by-pil"])
def test_a_decompression_bomb_is_an_invalid_image_not_a_failure(tmp_path: Path, side: int) -> None:
    from sgl_diffusion.pipelines.images import load_image

    path = tmp_path / "secret-folder" / "input.png"
    path.parent.mkdir()
    path.write_bytes(png(side, side))
    with pytest.raises(InvalidRequestError) as raised:
        load_image(str(path))
    assert raised.value.field == "image"
    assert "too many pixels" in str(raised.value) and "secret-folder" not in str(raised.value)
    # Other unreadable files are invalid too, named without their folder.
    path.write_bytes(b"not an image")
    with pytest.raises(InvalidRequestError, match="input.png") as raised:
        load_image(str(path))
    assert "secret-folder" not in str(raised.value)


def test_a_decompression_bomb_past_the_http_check_fails_its_job_as_invalid(bomb_server: Server) -> None:
    response = httpx.post(
        f"{bomb_server.base_url}/v1/videos",
        files={
            "prompt": (None, "a red square"),
            "size": (None, "32x32"),
            "num_inference_steps": (None, "2"),
            "num_frames": (None, "5"),
            "input_reference": ("bomb.png", png(20_000, 20_000), "image/png"),
        },
        timeout=30,
    )
    assert response.status_code == 200, response.text[:500]
    job_id = response.json()["id"]
    job: dict[str, Any] = {}

    def finished() -> bool:
        job.update(httpx.get(f"{bomb_server.base_url}/v1/videos/{job_id}", timeout=10).json())
        return job["status"] not in ("queued", "in_progress")

    wait_for(finished, timeout=120, interval=0.1, what=f"job {job_id} to finish")
    assert job["status"] == "failed", job
    assert job["error"]["code"] == "invalid_request", job
    assert job["error"]["message"].startswith("input_reference: ") and "too many pixels" in job["error"]["message"], job
    assert "/videos/" not in job["error"]["message"], job


# --- flags -----------------------------------------------------------------------------------------------


def test_limit_flags_reach_the_server_config_and_must_be_positive(capsys: pytest.CaptureFixture[str]) -> None:
    from sgl_diffusion.cli import serve

    flags = ["--max-connections", "8", "--header-read-timeout", "3", "--body-read-timeout", "4"]
    config = json.loads(serve.parse_serve_config([*flags, "--max-input-pixels", "100"]))["server"]
    keys = ("max_connections", "header_read_timeout_secs", "body_read_timeout_secs", "max_input_pixels")
    assert [config[key] for key in keys] == [8, 3, 4, 100]
    for flag in ("--max-connections", "--header-read-timeout", "--body-read-timeout", "--max-input-pixels"):
        with pytest.raises(SystemExit):
            serve.parse_serve_config([flag, "0"])
        assert f"{flag} must be at least 1" in capsys.readouterr().err
