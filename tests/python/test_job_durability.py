"""What the server keeps on disk and what it does with it: video jobs across SIGTERM, kill -9 and
damaged or left-over files, the cap on finished jobs, and `url` image outputs across a restart.

Real `sgl-diffusion serve` processes (CPU) on the tiny Wan2.1 text-to-video fixture (32x32, 9 frames)
and, for image outputs, the tiny FLUX.1 fixture. Several tests lay out an `--output-dir` by hand, in
the per-job format (`videos/<id>/job.json`) or in the single-index format of earlier versions
(`videos/index.json`), and check what a server started on it serves."""

from __future__ import annotations

import json
import os
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest

from server_util import Server, launch_server, running_servers, wait_for

SIZE = "32x32"
# Step times of the fixture with guidance (two forwards a step), measured on an idle 2-core x86 CPU: 1.7 ms
# at 32x32x9 (so even 1000 steps end within 2 s), 27 ms at 256x256x33, whose video then takes ~1.6 s to
# decode and encode. Only a bigger size makes a job long on a fast machine (steps are capped at 1000).
#: A job that finishes in well under a second on CPU.
FAST: dict[str, Any] = {"num_frames": 9, "fps": 8, "num_inference_steps": 2}
#: A job that runs ~10 s on an idle CPU (300 steps of ~27 ms, then its decode), a minute at most on a busy one.
MEDIUM: dict[str, Any] = {"size": "256x256", "num_frames": 33, "fps": 8, "num_inference_steps": 300}
#: A job that runs far longer than any test waits (~27 s of steps on an idle CPU), cancelled between two
#: steps within a few tens of milliseconds.
SLOW: dict[str, Any] = {"size": "256x256", "num_frames": 33, "fps": 8, "num_inference_steps": 1000}
READY_TIMEOUT = 300
#: Generous: the drain runs a medium job and a batch of five on 2 CPU cores that other work may share.
FINISH_TIMEOUT = 300
UNFINISHED = {"queued", "in_progress"}
FINISHED_CAP = 3


# --- helpers -------------------------------------------------------------------------------------------


def videos_url(server: Server, suffix: str = "") -> str:
    return f"{server.base_url}/v1/videos{suffix}"


def create(server: Server, **fields: Any) -> dict[str, Any]:
    body = {"prompt": "a paper boat on a pond", "size": SIZE, **fields}
    response = httpx.post(videos_url(server), json=body, timeout=30)
    assert response.status_code == 200, response.text[:500]
    return dict(response.json())


def get_job(server: Server, job_id: str) -> dict[str, Any]:
    response = httpx.get(videos_url(server, f"/{job_id}"), timeout=30)
    assert response.status_code == 200, response.text[:500]
    return dict(response.json())


def wait_finished(server: Server, job_id: str, timeout: float = FINISH_TIMEOUT) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def finished() -> bool:
        last.update(get_job(server, job_id))
        return last["status"] not in UNFINISHED

    wait_for(finished, timeout, interval=0.05, what=f"job {job_id} to finish")
    return last


def wait_progress(server: Server, job_id: str, above: int) -> dict[str, Any]:
    """Waits until the job runs with progress above `above` percent (or has finished)."""
    last: dict[str, Any] = {}

    def moved() -> bool:
        last.update(get_job(server, job_id))
        return last["status"] not in UNFINISHED or last["progress"] > above

    wait_for(moved, FINISH_TIMEOUT, interval=0.02, what=f"job {job_id} past {above} %")
    return last


def list_jobs(server: Server) -> list[dict[str, Any]]:
    response = httpx.get(videos_url(server), params={"limit": 100, "order": "asc"}, timeout=30)
    assert response.status_code == 200, response.text[:500]
    page = response.json()
    assert page["has_more"] is False, page
    return list(page["data"])


def content_status(server: Server, job_id: str) -> int:
    return httpx.get(videos_url(server, f"/{job_id}/content"), timeout=30).status_code


def new_job_id() -> str:
    """An id as the server makes them: creation time in milliseconds, then 32 random hex digits."""
    return f"video_{int(time.time() * 1000):012x}{secrets.token_hex(16)}"


def job_record(job_id: str, status: str, prompt: str = "a paper boat", steps: int = 2, **job: Any) -> dict[str, Any]:
    """A job record as the server stores it (`{"job": ..., "request": ...}`); `job` overrides fields."""
    now = int(time.time())
    fields: dict[str, Any] = {
        "id": job_id,
        "object": "video",
        "model": "wan",
        "status": status,
        "progress": 100 if status == "completed" else 0,
        "created_at": now,
        "completed_at": None if status in UNFINISHED else now,
        "expires_at": None if status in UNFINISHED else now + 3600,
        "size": SIZE,
        "seconds": "1",
        "num_frames": 9,
        "fps": 8,
        "prompt": prompt,
        "seed": 1,
        "error": None,
        **job,
    }
    request = {
        "prompt": prompt,
        "width": 32,
        "height": 32,
        "num_frames": 9,
        "fps": 8,
        "num_inference_steps": steps,
        "seed": 1,
        "output_format": "mp4",
    }
    return {"job": fields, "request": request}


def tree(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every path under `root` with what a write changes (size, mtime in ns, inode)."""
    found = {}
    for path in [root, *root.rglob("*")]:
        stat = path.lstat()
        found[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    return found


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sgl_diffusion.testing import build_fixture

    return build_fixture("wan21_t2v", tmp_path_factory.mktemp("models") / "wan21_t2v")


@pytest.fixture(scope="module")
def capped_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("capped")


@pytest.fixture(scope="module")
def capped_server(wan_dir: Path, capped_dir: Path) -> Iterator[Server]:
    flags = ["--output-dir", str(capped_dir), "--max-finished-jobs", str(FINISHED_CAP)]
    with running_servers(wan_dir, {"capped": flags}) as servers:
        yield servers["capped"].wait_ready(READY_TIMEOUT)


# --- shutdown ------------------------------------------------------------------------------------------


def test_sigterm_lets_running_and_queued_jobs_finish_and_store_them(wan_dir: Path, tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    # A running job, and five queued behind it (other steps, so another batch) that run as one batch
    # and end at the same moment, during the drain, just before the process exits.
    flags = ["--output-dir", str(output_dir), "--max-batch-size", "5", "--batch-delay-ms", "500"]
    first = launch_server(wan_dir, *flags, log_dir=tmp_path).wait_ready(READY_TIMEOUT)
    try:
        # Still running (its steps ~20x the time the next lines take) when the server is told to stop.
        running = create(first, **MEDIUM, seed=0)
        wait_progress(first, running["id"], above=0)
        queued = [create(first, **FAST, seed=seed) for seed in range(1, 6)]
        assert get_job(first, queued[-1]["id"])["status"] == "queued"
        assert get_job(first, running["id"])["status"] == "in_progress"
        first.terminate()
        # New work is refused while the running and queued jobs finish.
        wait_for(
            lambda: httpx.get(f"{first.base_url}/health", timeout=5).status_code == 503,
            30,
            what="the server to say it is shutting down",
        )
        late = httpx.post(videos_url(first), json={"prompt": "late", "size": SIZE, **FAST}, timeout=30)
        assert late.status_code == 503, late.text
        assert first.proc.wait(timeout=FINISH_TIMEOUT) == 0, first.log()
    finally:
        first.stop()

    second = launch_server(wan_dir, "--output-dir", str(output_dir), log_dir=tmp_path).wait_ready(READY_TIMEOUT)
    try:
        jobs = [running, *queued]
        for job in jobs:
            kept = get_job(second, job["id"])
            assert kept["status"] == "completed", (kept, first.log())
            assert content_status(second, job["id"]) == 200
        assert [job["id"] for job in list_jobs(second)] == [job["id"] for job in jobs]
    finally:
        second.stop()


# --- what a server finds at start ----------------------------------------------------------------------


def write_old_index(videos: Path, records: list[dict[str, Any]]) -> bytes:
    """The single index of earlier versions (pretty JSON, every job in one file)."""
    videos.mkdir(parents=True, exist_ok=True)
    data = json.dumps({"jobs": {r["job"]["id"]: r for r in records}}, indent=2).encode()
    (videos / "index.json").write_bytes(data)
    return data


def test_an_unreadable_index_is_moved_aside_and_the_jobs_rebuilt_from_their_folders(
    wan_dir: Path, tmp_path: Path
) -> None:
    videos = tmp_path / "out" / "videos"
    records = [job_record(new_job_id(), "completed") for _ in range(3)]
    for record in records:
        folder = videos / record["job"]["id"]
        folder.mkdir(parents=True)
        (folder / "video.mp4").write_bytes(b"an mp4")
    index = write_old_index(videos, records)
    truncated = index[: len(index) // 2]  # as a crash during an unsynced write leaves it
    (videos / "index.json").write_bytes(truncated)

    server = launch_server(wan_dir, "--output-dir", str(tmp_path / "out"), log_dir=tmp_path)
    try:
        server.wait_ready(READY_TIMEOUT)
        jobs = list_jobs(server)
        assert sorted(job["id"] for job in jobs) == sorted(r["job"]["id"] for r in records), server.log()
        for job in jobs:
            assert job["status"] == "failed" and job["error"]["code"] == "record_lost", job
            assert job["expires_at"] is not None, job
        aside = list(videos.glob("index.json.unreadable-*"))
        assert len(aside) == 1 and aside[0].read_bytes() == truncated, list(videos.iterdir())
        assert all((videos / r["job"]["id"] / "video.mp4").is_file() for r in records)  # kept until they expire
    finally:
        server.stop()


def test_start_repairs_records_videos_and_folders_it_finds(wan_dir: Path, tmp_path: Path) -> None:
    videos = tmp_path / "out" / "videos"
    videos.mkdir(parents=True)

    def folder(record: dict[str, Any] | None, *files: str) -> str:
        job_id = record["job"]["id"] if record else new_job_id()
        path = videos / job_id
        path.mkdir()
        if record is not None:
            (path / "job.json").write_text(json.dumps(record))
        for name in files:
            (path / name).write_bytes(b"data of " + name.encode())
        return job_id

    unreadable = folder(None, "input.png")
    (videos / unreadable / "job.json").write_text('{"job": {"id": ')
    never_acknowledged = folder(None, "input.png")
    written_before_the_crash = folder(job_record(new_job_id(), "in_progress"), "video.mp4")
    cancelled_with_video = folder(job_record(new_job_id(), "cancelled"), "video.mp4", "video.mp4.tmp")
    old_failure = folder(
        job_record(
            new_job_id(),
            "failed",
            expires_at=None,
            error={"code": "resubmit_failed", "message": "the queue was full"},
        )
    )
    (videos / "notes.txt").write_text("not the server's")

    server = launch_server(wan_dir, "--output-dir", str(tmp_path / "out"), log_dir=tmp_path)
    try:
        server.wait_ready(READY_TIMEOUT)
        jobs = {job["id"]: job for job in list_jobs(server)}
        log = server.log()
        # Its record moved aside, the job listed as failed until it expires with its files.
        assert jobs[unreadable]["status"] == "failed", (jobs, log)
        assert jobs[unreadable]["error"]["code"] == "record_unreadable"
        assert (videos / unreadable / "job.json.unreadable").read_text() == '{"job": {"id": '
        assert (videos / unreadable / "input.png").is_file()
        # No record: no client was ever told of it.
        assert never_acknowledged not in jobs and not (videos / never_acknowledged).exists()
        # The video was in place: the job completed.
        assert jobs[written_before_the_crash]["status"] == "completed", jobs[written_before_the_crash]
        assert jobs[written_before_the_crash]["expires_at"] is not None
        response = httpx.get(videos_url(server, f"/{written_before_the_crash}/content"), timeout=30)
        assert response.status_code == 200 and response.content == b"data of video.mp4"
        # A cancelled job keeps no video, nor a write cut short.
        assert jobs[cancelled_with_video]["status"] == "cancelled"
        assert not (videos / cancelled_with_video / "video.mp4").exists()
        assert not (videos / cancelled_with_video / "video.mp4.tmp").exists()
        # Every finished job expires.
        assert jobs[old_failure]["expires_at"] is not None, jobs[old_failure]
        assert (videos / "notes.txt").is_file()
    finally:
        server.stop()


def test_queued_jobs_that_cannot_run_again_fail_and_expire(wan_dir: Path, tmp_path: Path) -> None:
    # Five jobs queued when an earlier server stopped; this one takes one waiting request at a time.
    records = [job_record(new_job_id(), "queued", steps=500)]
    records += [job_record(new_job_id(), "queued") for _ in range(4)]
    write_old_index(tmp_path / "out" / "videos", records)
    server = launch_server(wan_dir, "--output-dir", str(tmp_path / "out"), "--max-queue-size", "1", log_dir=tmp_path)
    try:
        server.wait_ready(READY_TIMEOUT)

        def failed() -> list[dict[str, Any]]:
            return [job for job in list_jobs(server) if job["status"] == "failed"]

        # At most two fit (one running, one waiting): the others cannot be submitted again.
        wait_for(lambda: len(failed()) >= 3, 60, what="the resubmissions that did not fit to fail")
        for job in failed():
            assert job["error"]["code"] == "resubmit_failed", job
            assert job["completed_at"] is not None and job["expires_at"] is not None, job
    finally:
        server.stop()


# --- the store at work: compact records, no writes for nothing, the cap, cancel against completion -------


def test_each_job_is_one_compact_record_and_a_no_op_writes_nothing(capped_server: Server, capped_dir: Path) -> None:
    prompt = f"a lighthouse {secrets.token_hex(4)}"
    job = create(capped_server, **FAST, prompt=prompt)
    assert wait_finished(capped_server, job["id"])["status"] == "completed"
    record_file = capped_dir / "videos" / job["id"] / "job.json"
    # The job's end is visible to clients as soon as it is decided; its record follows from the writer
    # thread (a crash in between is repaired at start: a running job whose video exists is completed).
    wait_for(lambda: '"completed"' in record_file.read_text(), 10, what="the completed record on disk")
    record = record_file.read_text()
    assert record.count(prompt) == 1, record
    assert "\n" not in record.strip(), record
    assert json.loads(record)["job"]["status"] == "completed"
    assert get_job(capped_server, job["id"])["prompt"] == prompt

    before = tree(capped_dir)
    for method, suffix in [("DELETE", ""), ("POST", "/cancel"), ("GET", ""), ("GET", "/content")]:
        response = httpx.request(method, videos_url(capped_server, f"/video_0123456789abcdef{suffix}"), timeout=30)
        assert response.status_code == 404, response.text
    assert httpx.post(videos_url(capped_server, f"/{job['id']}/cancel"), timeout=30).status_code == 409
    assert tree(capped_dir) == before


def test_finished_jobs_beyond_the_cap_are_deleted_oldest_first(capped_server: Server, capped_dir: Path) -> None:
    made = []
    for _ in range(FINISHED_CAP + 2):
        job = create(capped_server, **SLOW)
        response = httpx.post(videos_url(capped_server, f"/{job['id']}/cancel"), timeout=30)
        assert response.status_code == 200 and response.json()["status"] == "cancelled", response.text
        made.append(job["id"])
    listed = [job["id"] for job in list_jobs(capped_server)]
    assert listed == made[-FINISHED_CAP:], listed
    wait_for(
        lambda: not any((capped_dir / "videos" / job_id).exists() for job_id in made[:-FINISHED_CAP]),
        10,
        what="the folders of the jobs beyond the cap to be deleted",
    )
    for job_id in made[-FINISHED_CAP:]:
        assert (capped_dir / "videos" / job_id / "job.json").is_file()


@pytest.mark.parametrize("delay", [0.0, 0.02, 0.05, 0.1, 0.2, 0.4])
def test_a_cancel_racing_the_completion_has_one_outcome(capped_server: Server, capped_dir: Path, delay: float) -> None:
    # Cancelled at about the moment the job ends (after its last step, while it decodes or stores its
    # video): either the cancel wins (200, cancelled, no video kept) or the completion does (409).
    job_id = create(capped_server, **FAST)["id"]
    wait_progress(capped_server, job_id, above=50)
    time.sleep(delay)
    response = httpx.post(videos_url(capped_server, f"/{job_id}/cancel"), timeout=30)
    final = wait_finished(capped_server, job_id)
    video = capped_dir / "videos" / job_id / "video.mp4"
    if response.status_code == 200:
        assert response.json()["status"] == "cancelled" and final["status"] == "cancelled", (response.text, final)
        assert content_status(capped_server, job_id) == 404
        # Written, or still being written, by the losing completion: it must go.
        wait_for(lambda: not video.exists(), 10, what="the cancelled job's video to be deleted")
    else:
        assert response.status_code == 409, response.text
        assert final["status"] == "completed", final
        assert content_status(capped_server, job_id) == 200 and video.is_file()
    assert final["expires_at"] is not None, final


# --- url image outputs ---------------------------------------------------------------------------------


def test_url_image_outputs_are_served_after_a_restart_until_they_expire(flux_dir: Path, tmp_path: Path) -> None:
    output_dir = tmp_path / "out"
    flags = ["--output-dir", str(output_dir)]
    body = {"prompt": "a red fox", "size": "32x32", "num_inference_steps": 2, "response_format": "url"}
    first = launch_server(flux_dir, *flags, log_dir=tmp_path).wait_ready(READY_TIMEOUT)
    try:
        urls = []
        for _ in range(2):
            response = httpx.post(f"{first.base_url}/v1/images/generations", json=body, timeout=120)
            assert response.status_code == 200, response.text[:500]
            urls.append(response.json()["data"][0]["url"].removeprefix(first.base_url))
        images = [httpx.get(f"{first.base_url}{url}", timeout=30).content for url in urls]
    finally:
        first.stop()
    assert first.proc.returncode == 0, first.log()
    # The first output is two hours old by the time the next server starts (TTL: one hour).
    files = sorted(output_dir.glob("img_*"))
    assert len(files) == 2, files
    old_file = next(path for path in files if urls[0].split("/")[3] in path.name)
    two_hours_ago = time.time() - 7200
    os.utime(old_file, (two_hours_ago, two_hours_ago))

    second = launch_server(flux_dir, *flags, log_dir=tmp_path).wait_ready(READY_TIMEOUT)
    try:
        kept = httpx.get(f"{second.base_url}{urls[1]}", timeout=30)
        assert kept.status_code == 200 and kept.content == images[1], second.log()
        assert httpx.get(f"{second.base_url}{urls[0]}", timeout=30).status_code == 404
        assert not old_file.exists(), "an expired output was left on disk"
    finally:
        second.stop()


def test_the_finished_jobs_cap_is_a_server_option() -> None:
    from sgl_diffusion.cli.options import CommandError
    from sgl_diffusion.cli.serve import build_config

    assert build_config({"max_finished_jobs": 5})["server"]["max_finished_jobs"] == 5
    assert "max_finished_jobs" not in build_config({})["server"]  # the server's default (10 000)
    with pytest.raises(CommandError, match="--max-finished-jobs must be at least 1"):
        build_config({"max_finished_jobs": 0})
