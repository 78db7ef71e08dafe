"""Runs `sgl-diffusion serve` as a real process on a free local port, for tests that talk HTTP to it."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

# The openai client's HTTP library (an httpx fork with httpx's API), installed with it.
import httpx2 as httpx

#: The installed console command, as users run it.
SGL_DIFFUSION = shutil.which("sgl-diffusion")


def free_port() -> int:
    """A port nobody listens on right now (the OS picks it for a socket bound to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A server process (started by `launch_server`; ready once `wait_ready` returned)."""

    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        """Everything the process has printed so far (stdout and stderr)."""
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120) -> Server:
        """Waits until `/health` answers 200; fails with the log if the process exits or times out."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not healthy after {timeout} s:\n{self.log()}")
            time.sleep(0.2)

    def terminate(self) -> None:
        """Sends SIGTERM (graceful shutdown) unless the process has exited."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM, then wait (SIGKILL if it does not exit in time); returns the exit code."""
        self.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)
        return self.proc.returncode

    def metrics(self, headers: Mapping[str, str] | None = None) -> str:
        response = httpx.get(f"{self.base_url}/metrics", headers=dict(headers or {}), timeout=10)
        response.raise_for_status()
        return response.text

    def metric(self, name: str, labels: str = "", headers: Mapping[str, str] | None = None) -> float:
        """The value of one sample, e.g. `metric("sgl_diffusion_queue_depth")`; 0 when it is absent."""
        return metric_value(self.metrics(headers), name, labels)

    def batches_run(self, headers: Mapping[str, str] | None = None) -> dict[int, int]:
        """Batches the engine has started, by number of requests in the batch."""
        return batch_counts(self.metrics(headers))


def metric_value(text: str, name: str, labels: str = "") -> float:
    """One sample of a Prometheus text exposition; `labels` is the exact `{...}` part, if any."""
    found = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def batch_counts(text: str) -> dict[int, int]:
    """`sgl_diffusion_batches_total{size="N"} COUNT` lines as {N: COUNT}."""
    return {
        int(size): int(float(count))
        for size, count in re.findall(r'^sgl_diffusion_batches_total\{size="(\d+)"\} (\S+)$', text, re.MULTILINE)
    }


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.05, what: str = "condition") -> None:
    """Polls `predicate()` until it is true; fails naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def launch_server(
    model_dir: str | os.PathLike[str],
    *extra_flags: str,
    log_dir: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
) -> Server:
    """Starts `sgl-diffusion serve` on the model (CPU, 127.0.0.1, a free port) without waiting for it."""
    if SGL_DIFFUSION is None:
        raise RuntimeError("the sgl-diffusion command is not installed (pip install -e .)")
    port = free_port()
    log_path = Path(log_dir) / f"server-{port}.log"
    command = [
        SGL_DIFFUSION, "serve", "--model-path", str(model_dir), "--device", "cpu",
        "--host", "127.0.0.1", "--port", str(port), *extra_flags,
    ]  # fmt: skip
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
        )
    return Server(proc=proc, port=port, log_path=log_path)


@contextmanager
def running_server(
    model_dir: str | os.PathLike[str],
    *extra_flags: str,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> Iterator[Server]:
    """A server that is ready (`/health` 200) inside the block; SIGTERM and a wait (a kill if it
    hangs) on exit."""
    with running_servers(model_dir, {"server": extra_flags}, env=env) as servers:
        yield servers["server"].wait_ready(timeout)


@contextmanager
def running_servers(
    model_dir: str | os.PathLike[str],
    flags: Mapping[str, Sequence[str]],
    env: Mapping[str, str] | None = None,
) -> Iterator[dict[str, Server]]:
    """Starts one server per entry of `flags` at once (they load in parallel), without waiting for
    them: call `wait_ready` on each before use. On exit all get SIGTERM together, then a wait."""
    with ExitStack() as stack:
        log_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="sgl-serve-"))
        servers: dict[str, Server] = {}
        try:
            for name, extra in flags.items():
                servers[name] = launch_server(model_dir, *extra, log_dir=log_dir, env=env)
            yield servers
        finally:
            for server in servers.values():
                server.terminate()
            for server in servers.values():
                server.stop()
