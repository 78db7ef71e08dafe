"""Create latency of `POST /v1/videos` as the job store grows, against a running server.

    python benches/jobs_http_latency.py --url http://127.0.0.1:30000 --jobs 1000 [--report 100,1000]

Each job is created (timed) and cancelled at once, so that it never runs and the store grows by one
finished job per step; the first job created runs for a long time and holds the executor, so the
others stay queued until cancelled. Prints a Markdown table: jobs in the store, median and 99th
percentile create latency over the last window. Serve a video model (e.g. the tiny Wan fixture:
`python -m sgl_diffusion.testing wan21_t2v DIR`) with `--max-finished-jobs` at least `--jobs`.
"""

from __future__ import annotations

import argparse
import statistics
import time

import httpx2 as httpx

BODY = {"prompt": "a paper boat on a pond", "size": "32x32", "num_frames": 9, "fps": 8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--report", default="100,1000,10000", help="store sizes to report at")
    args = parser.parse_args()
    report_at = {int(n) for n in args.report.split(",")} | {args.jobs}
    with httpx.Client(base_url=args.url, timeout=60) as client:
        blocker = client.post("/v1/videos", json={**BODY, "num_inference_steps": 1000, "num_frames": 33}).json()["id"]
        window: list[float] = []
        print("| jobs | create p50 ms | create p99 ms |\n|---|---|---|")
        for n in range(1, args.jobs + 1):
            started = time.perf_counter()
            response = client.post("/v1/videos", json={**BODY, "num_inference_steps": 2})
            window.append((time.perf_counter() - started) * 1000)
            response.raise_for_status()
            client.post(f"/v1/videos/{response.json()['id']}/cancel").raise_for_status()
            if n in report_at:
                window.sort()
                p99 = window[min(len(window) - 1, len(window) * 99 // 100)]
                print(f"| {n} | {statistics.median(window):.2f} | {p99:.2f} |", flush=True)
                window = []
        client.delete(f"/v1/videos/{blocker}")


if __name__ == "__main__":
    main()
