"""The server under sustained mixed load and under a schema-driven fuzzer, as real processes on 127.0.0.1.

* Soak: a few hundred mixed requests against a video server on the tiny Wan fixture (job creations,
  cancels, deletes, listings, retrievals, bad bodies and routes the model cannot serve), from a seeded
  random plan. Nothing answers 5xx, every job still listed reaches a terminal state, every deleted one
  is gone, and the server's resident memory grows by less than a stated bound.
* Fuzz: schemathesis generates requests from our own OpenAPI spec (`/openapi.json`) for every route
  of an image server and a video server, and checks that none gets a 5xx and that every response
  conforms to the spec (status code, content type, body schema).

CI runs the short form. `make soak-fuzz-long` runs the same code for 30 minutes with at least 10 000
fuzzed cases (SGL_SOAK_* / SGL_FUZZ_* variables below) and writes its result to
`benches/results/soak_fuzz_cpu.md` (SGL_SOAK_FUZZ_RESULTS).
"""

from __future__ import annotations

import datetime
import json
import os
import random
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from server_util import Server, running_server, wait_for

#: Mixed requests sent by the soak.
SOAK_REQUESTS = int(os.environ.get("SGL_SOAK_REQUESTS", "300"))
#: Growth of the server's resident memory allowed over the soak, after its warm-up (MiB). torch's CPU
#: allocator keeps freed blocks, so some growth is expected; a leak of the request or job records
#: (tens of KB each) over thousands of requests, or a body buffered whole, would exceed it.
SOAK_RSS_GROWTH_MIB = float(os.environ.get("SGL_SOAK_RSS_GROWTH_MIB", "400"))
#: Fuzzed cases per route (schemathesis' --max-examples) and the time budget of each fuzz run.
FUZZ_EXAMPLES = int(os.environ.get("SGL_FUZZ_EXAMPLES", "150"))
FUZZ_MAX_TIME = os.environ.get("SGL_FUZZ_MAX_TIME")
RESULTS = os.environ.get("SGL_SOAK_FUZZ_RESULTS")

API_KEY = "soak-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
#: A video job that finishes in about a second on the CPU.
TINY_JOB: dict[str, Any] = {"size": "32x32", "num_frames": 5, "fps": 8, "num_inference_steps": 1}
TERMINAL = {"completed", "failed", "cancelled"}
#: The fuzzed servers admit only tiny generations (--max-request-cost in token-steps, --max-request-pixels
#: in output pixels), so that schemathesis' valid examples run in well under a second each on the CPU;
#: bigger ones get a 400.
FUZZ_COST_BUDGET = "4000"
FUZZ_PIXEL_BUDGET = str(256 * 256)


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sgl_diffusion.testing import build_fixture

    return build_fixture("wan21_t2v", tmp_path_factory.mktemp("models") / "wan21_t2v")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def record_result(section: str, lines: list[str]) -> None:
    """Appends a section to the long run's results file (only when SGL_SOAK_FUZZ_RESULTS is set)."""
    if not RESULTS:
        return
    path = Path(RESULTS)
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    with path.open("a") as out:
        out.write(f"\n## {section} ({stamp})\n\n" + "\n".join(lines) + "\n")


# --------------------------------------------------------------------------------------------------
# soak
# --------------------------------------------------------------------------------------------------


class Soak:
    """One seeded plan of mixed requests against a video server, with the bookkeeping to check it."""

    def __init__(self, server: Server, seed: int) -> None:
        self.server = server
        self.client = httpx.Client(base_url=server.base_url, headers=AUTH, timeout=60)
        self.rng = random.Random(seed)
        self.jobs: list[str] = []
        self.deleted: set[str] = set()
        self.statuses: Counter[str] = Counter()

    def close(self) -> None:
        self.client.close()

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self.client.request(method, path, **kwargs)
        self.statuses[f"{method} {path.split('?')[0].split('/video_')[0]} {response.status_code}"] += 1
        assert response.status_code < 500, f"{method} {path}: {response.status_code} {response.text[:500]}"
        if response.status_code == 429:
            assert response.headers.get("retry-after"), "429 without Retry-After"
        return response

    def create(self) -> None:
        fields = {**TINY_JOB, "prompt": f"soak {len(self.jobs)}", "seed": self.rng.randrange(1 << 31)}
        response = self.call("POST", "/v1/videos", json=fields)
        if response.status_code == 200:
            self.jobs.append(response.json()["id"])

    def pick(self) -> str | None:
        alive = [job for job in self.jobs if job not in self.deleted]
        return self.rng.choice(alive) if alive else None

    def step(self) -> None:
        roll = self.rng.random()
        job = self.pick()
        if roll < 0.40 or job is None:
            self.create()
        elif roll < 0.55:
            response = self.call("POST", f"/v1/videos/{job}/cancel")
            assert response.status_code in (200, 400, 409), response.text
        elif roll < 0.65:
            response = self.call("DELETE", f"/v1/videos/{job}")
            assert response.status_code == 200, response.text
            self.deleted.add(job)
        elif roll < 0.75:
            self.call("GET", f"/v1/videos?limit={self.rng.randint(1, 100)}&order={self.rng.choice(['asc', 'desc'])}")
        elif roll < 0.85:
            self.call("GET", f"/v1/videos/{job}")
        elif roll < 0.90:
            response = self.call(
                "POST", "/v1/videos", content=b'{"prompt": ', headers={"Content-Type": "application/json"}
            )
            assert response.status_code == 400
        elif roll < 0.95:
            response = self.call("POST", "/v1/videos", json={**TINY_JOB, "prompt": "x", "num_inference_steps": -1})
            assert response.status_code == 400
        else:  # the images API on a video model: a clear 400, never a generation
            response = self.call("POST", "/v1/images/generations", json={"prompt": "x"})
            assert response.status_code in (400, 404), response.text

    def settle(self, timeout: float) -> dict[str, int]:
        """Waits until every job still listed is terminal; returns the count of each final status."""
        final: dict[str, str] = {}

        def all_terminal() -> bool:
            for job in self.jobs:
                if job in self.deleted or job in final:
                    continue
                response = self.call("GET", f"/v1/videos/{job}")
                if response.status_code == 404:
                    raise AssertionError(f"job {job} vanished without a DELETE")
                if response.json()["status"] in TERMINAL:
                    final[job] = response.json()["status"]
            return len(final) + len(self.deleted & set(self.jobs)) == len(self.jobs)

        wait_for(all_terminal, timeout=timeout, interval=0.5, what="every soak job to reach a terminal state")
        for job in self.deleted:
            assert self.call("GET", f"/v1/videos/{job}").status_code == 404, f"deleted job {job} is still served"
        return dict(Counter(final.values()))


def test_soak_mixed_requests_bounded_memory_and_every_job_terminal(wan_dir: Path, tmp_path: Path) -> None:
    flags = ["--api-key", API_KEY, "--output-dir", str(tmp_path / "out"), "--max-queue-size", "32"]
    with running_server(wan_dir, *flags, timeout=300) as server:
        soak = Soak(server, seed=0)
        try:
            # Warm-up: the first generations grow the process (torch's allocator, ffmpeg) once.
            for _ in range(3):
                soak.create()
            soak.settle(timeout=300)
            baseline = rss_mib(server.proc.pid)
            started = time.monotonic()
            for _ in range(SOAK_REQUESTS):
                soak.step()
            finals = soak.settle(timeout=600)
            growth = rss_mib(server.proc.pid) - baseline
            elapsed = time.monotonic() - started
            listed = soak.call("GET", "/v1/videos?limit=100").json()
            assert server.proc.poll() is None, "the server died during the soak"
        finally:
            soak.close()
    assert growth < SOAK_RSS_GROWTH_MIB, f"resident memory grew by {growth:.0f} MiB over the soak"
    assert finals.get("completed", 0) > 0, finals
    assert listed["object"] == "list"
    summary = f"{len(soak.jobs)} jobs created, {len(soak.deleted)} deleted; final states {finals}"
    memory = f"{baseline:.0f} MiB after warm-up, grew by {growth:.0f} MiB (bound {SOAK_RSS_GROWTH_MIB:.0f})"
    record_result(
        "soak",
        [
            f"* {SOAK_REQUESTS} mixed requests in {elapsed:.0f} s; {summary}",
            f"* resident memory {memory}; no 5xx",
            f"* responses: {dict(sorted(soak.statuses.items()))}",
        ],
    )


# --------------------------------------------------------------------------------------------------
# fuzz
# --------------------------------------------------------------------------------------------------


@contextmanager
def fuzz_target(model_dir: Path, out: Path) -> Iterator[Server]:
    """A server whose generations are capped at tiny ones (FUZZ_COST_BUDGET, FUZZ_PIXEL_BUDGET), behind the API key."""
    flags = ["--api-key", API_KEY, "--output-dir", str(out), "--max-request-cost", FUZZ_COST_BUDGET]
    flags += ["--max-request-pixels", FUZZ_PIXEL_BUDGET]
    with running_server(model_dir, *flags, timeout=300) as server:
        yield server


@pytest.fixture(scope="module")
def flux_server(flux_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with fuzz_target(flux_dir, tmp_path_factory.mktemp("fuzz-images")) as server:
        yield server


@pytest.fixture(scope="module")
def wan_server(wan_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with fuzz_target(wan_dir, tmp_path_factory.mktemp("fuzz-videos")) as server:
        yield server


def schemathesis(server: Server, report: Path) -> subprocess.CompletedProcess[str]:
    """`st run` against the live server's own spec; every check that concerns the server's answers."""
    st = shutil.which("st", path=str(Path(sys.executable).parent)) or shutil.which("st")
    assert st is not None, "schemathesis is not installed (it is in the test extra)"
    checks = "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"
    command = [
        st, "run", f"{server.base_url}/openapi.json", "--checks", checks, "--max-examples", str(FUZZ_EXAMPLES),
        "--seed", "0", "--workers", "1", "--header", f"Authorization: Bearer {API_KEY}", "--no-color",
        "--request-timeout", "120", "--generation-database", "none",
        # Hypothesis gives up on `/v1/models/{model}` when most generated ids cannot be put in a URL
        # path; that is the generator's limit, not a finding about the server.
        "--suppress-health-check", "filter_too_much",
        "--report", "junit", "--report-junit-path", str(report),
    ]  # fmt: skip
    if FUZZ_MAX_TIME:
        command += ["--max-time", FUZZ_MAX_TIME]
    # In the test's own folder: schemathesis keeps a crash cache (.schemathesis/) in its working directory.
    return subprocess.run(command, cwd=report.parent, capture_output=True, text=True, timeout=3600, check=False)


def fuzz_counts(report: Path) -> dict[str, int]:
    root = ET.parse(report).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    return {key: sum(int(suite.get(key, 0)) for suite in suites) for key in ("tests", "failures", "errors")}


@pytest.mark.parametrize("which", ["flux_server", "wan_server"])
def test_schemathesis_finds_no_server_error_or_schema_violation(
    which: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    server: Server = request.getfixturevalue(which)
    report = tmp_path / "junit.xml"
    run = schemathesis(server, report)
    summary = run.stdout[-6000:]
    assert report.is_file(), f"schemathesis wrote no report (exit {run.returncode}):\n{summary}\n{run.stderr[-3000:]}"
    counts = fuzz_counts(report)
    assert run.returncode == 0 and counts["failures"] == counts["errors"] == 0, summary
    assert counts["tests"] > 5, f"too few operations fuzzed: {counts}\n{summary}"
    assert server.proc.poll() is None, "the server died under the fuzzer"
    cases = [line for line in run.stdout.splitlines() if "test cases" in line.lower() or "generated" in line.lower()]
    record_result(f"fuzz: {which}", [f"* {json.dumps(counts)}; {' / '.join(cases[-3:]) or 'see the junit report'}"])
