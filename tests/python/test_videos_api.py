"""The OpenAI videos API (`/v1/videos`) as clients use it: real `sgl-diffusion serve` processes on the tiny
Wan2.1 text-to-video fixture (CPU, 32x32, 9 frames, 2 steps), spoken to with the official `openai` client
where it has a method and with raw HTTP for everything else.

Most tests use the text-to-video fixture (`wan21_t2v`), which must refuse an input image with a 400 naming
`input_reference`; image-to-video is tested on the `wan21_i2v` fixture (WanImageToVideoPipeline)."""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest
from openai import OpenAI
from PIL import Image

from server_util import Server, launch_server, running_servers, wait_for
from sgl_diffusion.runtime.video import decode_mp4

# OpenAI retired its video API; the official client warns on every `videos` method.
pytestmark = pytest.mark.filterwarnings("ignore:The Sora API is scheduled to permanently shut down:DeprecationWarning")

SIZE = "32x32"
#: A job that finishes well under a few seconds on CPU: 9 frames (3 latent frames) in 2 steps at 8 fps.
FAST: dict[str, Any] = {"num_frames": 9, "fps": 8, "num_inference_steps": 2}
#: A job that runs for a long while (10-100 ms a step on 2 busy cores): cancelled or killed by its test.
SLOW: dict[str, Any] = {"num_frames": 9, "fps": 8, "num_inference_steps": 500}
#: Seconds allowed for the servers, loading in parallel, to become ready.
READY_TIMEOUT = 300
#: Seconds allowed for a FAST job (and whatever short job runs before it) to finish.
FINISH_TIMEOUT = 90
UNFINISHED = {"queued", "in_progress"}
ERROR_FIELDS = {"message", "type", "param", "code"}


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = png_bytes()
PNG_DATA_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()


# --- helpers -------------------------------------------------------------------------------------------


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """Checks the status and that the body is the OpenAI error body; returns its `error` object."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == ERROR_FIELDS, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    return error


def videos_url(server: Server, suffix: str = "") -> str:
    return f"{server.base_url}/v1/videos{suffix}"


def post_job(server: Server, **fields: Any) -> httpx.Response:
    return httpx.post(videos_url(server), json={"prompt": "a paper boat on a pond", "size": SIZE, **fields}, timeout=30)


def create(server: Server, **fields: Any) -> dict[str, Any]:
    """Creates a job with a JSON body; returns the job as created."""
    response = post_job(server, **fields)
    assert response.status_code == 200, response.text[:500]
    job = response.json()
    assert job["object"] == "video" and job["id"].startswith("video_"), job
    return job


def get_job(server: Server, job_id: str) -> dict[str, Any]:
    response = httpx.get(videos_url(server, f"/{job_id}"), timeout=30)
    assert response.status_code == 200, response.text[:500]
    return response.json()


def wait_job(
    server: Server, job_id: str, until: Callable[[dict[str, Any]], bool], what: str, timeout: float = FINISH_TIMEOUT
) -> dict[str, Any]:
    """Polls the job until `until(job)`; returns the job as last seen."""
    last: dict[str, Any] = {}

    def check() -> bool:
        last.update(get_job(server, job_id))
        return until(last)

    wait_for(check, timeout, interval=0.05, what=f"job {job_id} to be {what}")
    return last


def wait_finished(server: Server, job_id: str, timeout: float = FINISH_TIMEOUT) -> dict[str, Any]:
    return wait_job(server, job_id, lambda job: job["status"] not in UNFINISHED, "finished", timeout)


def wait_running(server: Server, job_id: str) -> dict[str, Any]:
    """Waits until the job runs and has done at least one step (progress > 0)."""
    job = wait_job(
        server, job_id, lambda job: job["status"] not in UNFINISHED or job["progress"] > 0, "running partway"
    )
    assert job["status"] == "in_progress", job
    return job


def list_ids(server: Server, **params: Any) -> list[str]:
    response = httpx.get(videos_url(server), params={"limit": 100, **params}, timeout=30)
    assert response.status_code == 200, response.text[:500]
    page = response.json()
    assert page["object"] == "list" and page["has_more"] is False, page
    return [job["id"] for job in page["data"]]


def content(server: Server, job_id: str) -> bytes:
    response = httpx.get(videos_url(server, f"/{job_id}/content"), timeout=30)
    assert response.status_code == 200, response.text[:500]
    assert response.headers["content-type"] == "video/mp4"
    return response.content


def assert_video(data: bytes, frames: int, fps: float, size: tuple[int, int] = (32, 32)) -> None:
    """The MP4 decodes to `frames` frames of `size` (width, height) at `fps`."""
    decoded, rate = decode_mp4(data)
    assert decoded.shape == (frames, size[1], size[0], 3), decoded.shape
    assert rate == pytest.approx(fps), rate


def job_folders(output_dir: Path) -> set[str]:
    """The job folders under a server's `--output-dir`."""
    return {path.name for path in (output_dir / "videos").iterdir() if path.is_dir()}


def wait_denoised(server: Server, job_id: str) -> dict[str, Any]:
    """Waits until a FAST (2-step) job has done its last step but is still decoding and encoding (for
    about a second on CPU): progress above 50 % while in progress."""
    job = wait_job(
        server, job_id, lambda job: job["status"] not in UNFINISHED or job["progress"] > 50, "past its last step"
    )
    assert job["status"] == "in_progress", f"the job finished before the test caught it decoding: {job}"
    return job


def cancel(server: Server, job_id: str) -> httpx.Response:
    # The official client has no `videos.cancel` (OpenAI's API never had one): raw HTTP.
    return httpx.post(videos_url(server, f"/{job_id}/cancel"), timeout=30)


# --- servers ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sgl_diffusion.testing import build_fixture

    return build_fixture("wan21_t2v", tmp_path_factory.mktemp("models") / "wan21_t2v")


@pytest.fixture(scope="module")
def wan_i2v_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sgl_diffusion.testing import build_fixture

    return build_fixture("wan21_i2v", tmp_path_factory.mktemp("models") / "wan21_i2v")


@pytest.fixture(scope="module")
def output_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each server's `--output-dir`, by the server fixture's name."""
    return {name: tmp_path_factory.mktemp(name) for name in ("server", "ttl_server", "i2v_server")}


@pytest.fixture(scope="module")
def servers(request: pytest.FixtureRequest, wan_dir: Path, output_dirs: dict[str, Path]) -> Iterator[dict[str, Server]]:
    """Every server the selected tests use, started at once so that they load in parallel (each
    fixture below waits for its own)."""
    t2v_flags = {
        # Default TTL (an hour): nothing expires during the tests. The last test kills it (SIGKILL)
        # and starts another on the same folder.
        "server": ["--output-dir", str(output_dirs["server"])],
        # Finished jobs expire after 2 s (the purge then runs every 2 s).
        "ttl_server": ["--output-dir", str(output_dirs["ttl_server"]), "--output-ttl", "2"],
    }
    selected = [item for item in request.session.items if getattr(item, "module", None) is request.module]
    wanted = {name for item in selected for name in getattr(item, "fixturenames", ())}
    with ExitStack() as stack:
        launched = stack.enter_context(
            running_servers(wan_dir, {name: extra for name, extra in t2v_flags.items() if name in wanted})
        )
        if "i2v_server" in wanted:
            # The image-to-video fixture (WanImageToVideoPipeline), built only when a selected test needs it.
            i2v_dir = request.getfixturevalue("wan_i2v_dir")
            i2v_flags = {"i2v_server": ["--output-dir", str(output_dirs["i2v_server"])]}
            launched = {**launched, **stack.enter_context(running_servers(i2v_dir, i2v_flags))}
        yield launched


@pytest.fixture(scope="module")
def server(servers: dict[str, Server]) -> Server:
    return servers["server"].wait_ready(READY_TIMEOUT)


@pytest.fixture(scope="module")
def ttl_server(servers: dict[str, Server]) -> Server:
    return servers["ttl_server"].wait_ready(READY_TIMEOUT)


@pytest.fixture(scope="module")
def i2v_server(servers: dict[str, Server]) -> Server:
    return servers["i2v_server"].wait_ready(READY_TIMEOUT)


@pytest.fixture(scope="module")
def client(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=60)


# --- the job lifecycle through the official client -----------------------------------------------------


def test_create_poll_download_and_list_with_the_official_client(
    client: OpenAI, server: Server, output_dirs: dict[str, Path]
) -> None:
    video = client.videos.create(
        prompt="a paper boat on a pond",
        size=SIZE,
        extra_body={"num_frames": 11, "fps": 8, "seed": 7, "num_inference_steps": 2},
    )
    created = video.to_dict()
    assert created["object"] == "video" and created["status"] in {"queued", "in_progress", "completed"}, created
    assert 0 <= created["progress"] <= 100
    # What will be used: 11 frames round down to 4k+1 = 9; 8 fps; 8 frame intervals at 8 fps = 1 s.
    assert (created["size"], created["num_frames"], created["fps"], created["seconds"]) == (SIZE, 9, 8, "1")
    assert created["seed"] == 7 and created["prompt"] == "a paper boat on a pond"
    assert created["error"] is None

    deadline = time.monotonic() + FINISH_TIMEOUT
    while video.status in UNFINISHED:
        assert time.monotonic() < deadline, f"job {video.id} did not finish: {video}"
        time.sleep(0.05)
        video = client.videos.retrieve(video.id)
    done = video.to_dict()
    assert done["status"] == "completed" and done["progress"] == 100 and done["error"] is None, done
    assert (done["num_frames"], done["fps"], done["seed"]) == (9, 8, 7)
    assert done["created_at"] <= done["completed_at"] < done["expires_at"], done

    data = client.videos.download_content(video.id).read()
    assert data == content(server, video.id)
    assert_video(data, frames=9, fps=8)
    assert (output_dirs["server"] / "videos" / video.id / "video.mp4").read_bytes() == data
    assert video.id in [listed.id for listed in client.videos.list()]


def test_seconds_and_fps_decide_the_frame_count(client: OpenAI) -> None:
    # 1 s at 8 fps = 8 frame intervals = 9 frames.
    video = client.videos.create(
        prompt="a kite", size=SIZE, seconds="1", extra_body={"fps": 8, "num_inference_steps": 2}
    ).to_dict()
    assert (video["num_frames"], video["fps"], video["seconds"]) == (9, 8, "1"), video
    assert client.videos.delete(video["id"]).deleted is True  # it need not run


def test_without_frames_or_seconds_the_model_defaults_hold(server: Server) -> None:
    # Wan2.1's own defaults (81 frames at 16 fps), not SGLang's 24 fps x 4 s.
    job = create(server, num_inference_steps=1)
    try:
        assert (job["num_frames"], job["fps"], job["seconds"]) == (81, 16, "5"), job
    finally:
        deleted = httpx.delete(videos_url(server, f"/{job['id']}"), timeout=30)
        assert deleted.status_code == 200, deleted.text


# --- multipart: every field as a form string ----------------------------------------------------------


def test_the_official_client_sends_multipart_with_string_fields(server: Server) -> None:
    sent: list[tuple[str, bytes]] = []

    def record(request: httpx.Request) -> None:
        sent.append((request.headers["content-type"], request.read()))

    http_client = httpx.Client(event_hooks={"request": [record]})
    with OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, http_client=http_client) as client:
        video = client.videos.create(
            prompt="a lighthouse",
            size=SIZE,
            extra_body={"num_inference_steps": "2", "num_frames": "9", "fps": "8", "seed": "42"},
        ).to_dict()
    ((content_type, body),) = sent
    assert content_type.startswith("multipart/form-data; boundary="), content_type
    # extra_body values travel as form fields; the client sends no JSON.
    assert b'name="num_inference_steps"\r\n\r\n2\r\n' in body and b'name="seed"\r\n\r\n42\r\n' in body, body
    assert (video["num_frames"], video["fps"], video["seed"]) == (9, 8, 42), video
    assert httpx.delete(videos_url(server, f"/{video['id']}"), timeout=30).status_code == 200


def test_raw_multipart_form_strings_parse_as_numbers(server: Server) -> None:
    form = {
        "prompt": "a windmill",
        "size": SIZE,
        "num_frames": "10",  # rounds down to 9
        "fps": "4",
        "seed": "123",
        "num_inference_steps": "2",
        "guidance_scale": "1.5",
        "flow_shift": "3.0",
        "negative_prompt": "blurry",
    }
    response = httpx.post(videos_url(server), files={k: (None, v) for k, v in form.items()}, timeout=30)
    assert response.status_code == 200, response.text[:500]
    job = response.json()
    assert (job["num_frames"], job["fps"], job["seed"], job["seconds"]) == (9, 4, 123, "2"), job
    done = wait_finished(server, job["id"])
    assert done["status"] == "completed", done
    assert_video(content(server, job["id"]), frames=9, fps=4)

    not_a_number = httpx.post(
        videos_url(server),
        files={"prompt": (None, "x"), "size": (None, SIZE), "num_frames": (None, "nine")},
        timeout=30,
    )
    assert error_of(not_a_number, 400)["param"] == "num_frames"


# --- listing -------------------------------------------------------------------------------------------


def test_list_orders_and_pages(client: OpenAI, server: Server) -> None:
    mine = [create(server, **FAST)["id"] for _ in range(3)]
    ascending = list_ids(server, order="asc")
    # Creation order; nothing else was created meanwhile, so they are the three newest.
    assert ascending[-3:] == mine, (ascending, mine)
    assert list_ids(server) == list_ids(server, order="desc") == ascending[::-1]

    # Pages of two, following `after`, add up to the whole list; `has_more` is false on the last only.
    paged: list[str] = []
    after: str | None = None
    while True:
        params: dict[str, Any] = {"order": "asc", "limit": 2, **({"after": after} if after else {})}
        response = httpx.get(videos_url(server), params=params, timeout=30)
        assert response.status_code == 200, response.text
        page = response.json()
        ids = [job["id"] for job in page["data"]]
        assert 1 <= len(ids) <= 2, page
        paged += ids
        if not page["has_more"]:
            break
        assert len(ids) == 2, page
        after = ids[-1]
    assert paged == ascending

    first = httpx.get(videos_url(server), params={"limit": 1}, timeout=30).json()
    assert [job["id"] for job in first["data"]] == [mine[-1]] and first["has_more"] is True, first
    # The official client's auto-paging follows the same cursor; it reads `last_id` from each page, as
    # OpenAI's list responses carry `first_id` / `last_id`.
    try:
        assert [video.id for video in client.videos.list(order="asc", limit=2)] == ascending
    finally:
        for job_id in mine:  # they need not run
            assert httpx.delete(videos_url(server, f"/{job_id}"), timeout=30).status_code == 200


# --- progress and cancellation -------------------------------------------------------------------------


def test_progress_is_real_and_cancel_frees_the_worker(server: Server) -> None:
    slow = create(server, **SLOW)
    behind = create(server, **FAST)  # queued behind it: one job runs at a time
    seen: list[int] = []

    def partway() -> bool:
        job = get_job(server, slow["id"])
        if job["status"] == "in_progress":
            seen.append(job["progress"])
        return job["status"] not in UNFINISHED or (job["status"] == "in_progress" and 0 < job["progress"] < 100)

    wait_for(partway, FINISH_TIMEOUT, interval=0.05, what="the slow job to be in progress partway")
    running = get_job(server, slow["id"])
    assert running["status"] == "in_progress" and 0 < running["progress"] < 100, running
    assert seen == sorted(seen), seen  # progress never goes back
    assert get_job(server, behind["id"])["status"] == "queued"
    # Not completed yet: no content.
    error_of(httpx.get(videos_url(server, f"/{slow['id']}/content"), timeout=30), 404)

    # Cancel the queued one, then the running one.
    response = cancel(server, behind["id"])
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "cancelled"
    response = cancel(server, slow["id"])
    assert response.status_code == 200, response.text
    cancelled = response.json()
    assert cancelled["id"] == slow["id"] and cancelled["status"] == "cancelled", cancelled
    assert cancelled["completed_at"] is not None and cancelled["expires_at"] is not None, cancelled
    # Cancelling again changes nothing.
    again = cancel(server, slow["id"])
    assert again.status_code == 200 and again.json()["status"] == "cancelled", again.text

    # The worker is free: the next job runs now, not after the remaining few hundred steps.
    following = create(server, **FAST)
    done = wait_finished(server, following["id"])
    assert done["status"] == "completed", done
    # Had the slow job run to its end it would have been marked completed; the queued one never ran.
    stopped = get_job(server, slow["id"])
    assert stopped["status"] == "cancelled" and stopped["progress"] < 100, stopped
    never_ran = get_job(server, behind["id"])
    assert never_ran["status"] == "cancelled" and never_ran["progress"] == 0, never_ran
    error_of(httpx.get(videos_url(server, f"/{slow['id']}/content"), timeout=30), 404)
    assert slow["id"] in list_ids(server)  # listed until it expires

    # A completed job cannot be cancelled.
    error = error_of(cancel(server, following["id"]), 409)
    assert following["id"] in error["message"], error
    assert get_job(server, following["id"])["status"] == "completed"


def test_a_job_cancelled_after_its_last_step_stays_cancelled(server: Server) -> None:
    # 81 frames: decoding and MP4 encoding take long enough (a second or more on CPU) for the cancel to
    # land while they run; with 9 frames the whole-clip decoder can finish before the request arrives.
    job_id = create(server, **{**FAST, "num_frames": 81})["id"]
    wait_denoised(server, job_id)
    response = cancel(server, job_id)
    # Too late to stop it would be a 409; a 200 that says `cancelled` must hold.
    assert response.status_code == 200 and response.json()["status"] == "cancelled", response.text
    # The engine runs one job at a time: once the next one completed, the pipeline is done with this one.
    following = create(server, **FAST)
    assert wait_finished(server, following["id"])["status"] == "completed"
    job = get_job(server, job_id)
    assert job["status"] == "cancelled", job
    error_of(httpx.get(videos_url(server, f"/{job_id}/content"), timeout=30), 404)


# --- deletion ------------------------------------------------------------------------------------------


def test_delete_removes_the_job_and_its_files(client: OpenAI, server: Server, output_dirs: dict[str, Path]) -> None:
    job_id = create(server, **FAST)["id"]
    assert wait_finished(server, job_id)["status"] == "completed"
    folder = output_dirs["server"] / "videos" / job_id
    assert (folder / "video.mp4").is_file()

    deleted = client.videos.delete(job_id)
    assert deleted.to_dict() == {"id": job_id, "object": "video.deleted", "deleted": True}
    assert error_of(httpx.get(videos_url(server, f"/{job_id}"), timeout=30), 404)["param"] is None
    error_of(httpx.get(videos_url(server, f"/{job_id}/content"), timeout=30), 404)
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(job_id)
    assert not folder.exists()
    assert job_id not in list_ids(server)
    error_of(httpx.delete(videos_url(server, f"/{job_id}"), timeout=30), 404)


def test_deleting_a_running_job_stops_it_and_leaves_no_files(server: Server, output_dirs: dict[str, Path]) -> None:
    slow = create(server, **SLOW)["id"]
    # Queued behind it; 81 frames so that its decoding lasts long enough for the delete to land while it runs (as
    # in the cancel test below: with 9 frames the decoder can finish between two polls).
    late = create(server, **{**FAST, "num_frames": 81})["id"]
    # Deleted mid-denoising: the loop stops between steps.
    wait_running(server, slow)
    response = httpx.delete(videos_url(server, f"/{slow}"), timeout=30)
    assert response.status_code == 200, response.text
    assert response.json() == {"id": slow, "object": "video.deleted", "deleted": True}
    error_of(httpx.get(videos_url(server, f"/{slow}"), timeout=30), 404)
    # The worker is free: the next job runs now. Deleted after its last step, while it decodes: it must
    # not write its video afterwards into a folder no record points to (nothing would ever delete it).
    wait_denoised(server, late)
    response = httpx.delete(videos_url(server, f"/{late}"), timeout=30)
    assert response.status_code == 200, response.text

    # Once the next job completed, the pipeline is done with both.
    following = create(server, **FAST)
    assert wait_finished(server, following["id"])["status"] == "completed"
    for job_id in (slow, late):
        error_of(httpx.get(videos_url(server, f"/{job_id}"), timeout=30), 404)
        assert job_id not in list_ids(server)
    assert not (output_dirs["server"] / "videos" / slow).exists()
    assert not (output_dirs["server"] / "videos" / late).exists(), "a deleted job's video was written afterwards"


# --- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        pytest.param({"num_frames": 0}, "num_frames", id="num_frames-0"),
        pytest.param({"num_frames": -1}, "num_frames", id="num_frames-negative"),
        pytest.param({"size": "40x32"}, "size", id="size-not-multiple-of-16"),
        pytest.param({"size": "big"}, "size", id="size-unparsable"),
        pytest.param({"n": 2}, "n", id="n-2"),
        # 1 s at 8 fps is 9 frames.
        pytest.param({"seconds": "1", "num_frames": 17}, "seconds", id="seconds-vs-num_frames"),
        pytest.param({"seconds": "-1"}, "seconds", id="seconds-negative"),
        pytest.param({"input_reference": PNG_DATA_URL}, "input_reference", id="image-data-url"),
        pytest.param({"input_reference": "https://example.com/a.png"}, "input_reference", id="image-remote-url"),
    ],
)
def test_bad_json_fields_get_the_openai_error_body(server: Server, fields: dict[str, Any], param: str) -> None:
    before = list_ids(server)
    error = error_of(post_job(server, **(FAST | fields)), 400)
    assert error["param"] == param, error
    assert list_ids(server) == before  # nothing was queued


def test_a_missing_prompt_is_a_400(server: Server) -> None:
    error_of(httpx.post(videos_url(server), json={"size": SIZE}, timeout=30), 400)
    error_of(httpx.post(videos_url(server), files={"size": (None, SIZE)}, timeout=30), 400)


def test_an_unknown_model_name_is_model_not_found(server: Server) -> None:
    error = error_of(post_job(server, model="sora-2", **FAST), 404)
    assert error["code"] == "model_not_found", error


@pytest.mark.parametrize("image", [b"these bytes are no image", PNG], ids=["unreadable", "png"])
def test_an_input_image_is_refused_by_a_text_to_video_model(
    client: OpenAI, server: Server, output_dirs: dict[str, Path], image: bytes
) -> None:
    # This T2V model refuses any input_reference, readable or not (image-to-video: see the i2v tests).
    before = list_ids(server)
    folders = job_folders(output_dirs["server"])
    response = httpx.post(
        videos_url(server),
        data={"prompt": "a paper boat", "size": SIZE},
        files={"input_reference": ("reference.png", image, "image/png")},
        timeout=30,
    )
    assert error_of(response, 400)["param"] == "input_reference"
    with pytest.raises(openai.BadRequestError) as raised:
        client.videos.create(prompt="a paper boat", size=SIZE, input_reference=("reference.png", image, "image/png"))
    assert raised.value.status_code == 400 and raised.value.param == "input_reference"
    assert list_ids(server) == before
    assert job_folders(output_dirs["server"]) == folders  # nothing was stored for the refused requests


@pytest.mark.parametrize(
    ("method", "suffix"),
    [("GET", ""), ("GET", "/content"), ("POST", "/cancel"), ("DELETE", "")],
    ids=["retrieve", "content", "cancel", "delete"],
)
def test_unknown_job_ids_are_404(server: Server, method: str, suffix: str) -> None:
    response = httpx.request(method, videos_url(server, f"/video_doesnotexist{suffix}"), timeout=30)
    assert error_of(response, 404)["code"] == "not_found"


@pytest.mark.parametrize(
    ("params", "param"),
    [({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"order": "up"}, "order"), ({"limit": "abc"}, "limit")],
    ids=["limit-0", "limit-101", "order-up", "limit-not-a-number"],
)
def test_bad_list_parameters_get_the_openai_error_body(server: Server, params: dict[str, Any], param: str) -> None:
    response = httpx.get(videos_url(server), params=params, timeout=30)
    assert error_of(response, 400)["param"] == param


def test_an_image_request_to_a_video_model_is_a_400(server: Server) -> None:
    response = httpx.post(
        f"{server.base_url}/v1/images/generations",
        json={"prompt": "a paper boat", "size": SIZE, "num_inference_steps": 2},
        timeout=30,
    )
    assert error_of(response, 400)["param"] == "model"


# --- image-to-video ------------------------------------------------------------------------------------


def test_image_to_video_from_an_uploaded_image(i2v_server: Server) -> None:
    # Without an image this model cannot run.
    error = error_of(post_job(i2v_server, **FAST), 400)
    assert error["param"] == "input_reference", error
    # Unreadable bytes are refused before anything is queued.
    response = httpx.post(
        videos_url(i2v_server),
        files={
            "prompt": (None, "a red square"),
            "size": (None, SIZE),
            "input_reference": ("a.png", b"nope", "image/png"),
        },
        timeout=30,
    )
    assert error_of(response, 400)["param"] == "input_reference"
    assert list_ids(i2v_server) == []

    # The official client uploads the image as a multipart file.
    with OpenAI(base_url=f"{i2v_server.base_url}/v1", api_key="unused", max_retries=0, timeout=60) as client:
        video = client.videos.create(
            prompt="a red square drifting",
            size=SIZE,
            input_reference=("reference.png", PNG, "image/png"),
            extra_body={**FAST, "seed": 5},
        ).to_dict()
    assert (video["size"], video["num_frames"], video["fps"], video["seed"]) == (SIZE, 9, 8, 5), video
    done = wait_finished(i2v_server, video["id"])
    assert done["status"] == "completed" and done["error"] is None, done
    assert_video(content(i2v_server, video["id"]), frames=9, fps=8)
    # A data URL in JSON works too.
    job = create(i2v_server, **FAST, input_reference=PNG_DATA_URL)
    assert wait_finished(i2v_server, job["id"])["status"] == "completed"
    assert_video(content(i2v_server, job["id"]), frames=9, fps=8)


# --- expiry --------------------------------------------------------------------------------------------


def test_finished_jobs_expire_with_their_files(ttl_server: Server, output_dirs: dict[str, Path]) -> None:
    videos = output_dirs["ttl_server"] / "videos"
    completed_id = create(ttl_server, **FAST)["id"]
    cancelled_id = create(ttl_server, **SLOW)["id"]  # queued behind the first one
    response = cancel(ttl_server, cancelled_id)
    assert response.status_code == 200 and response.json()["status"] == "cancelled", response.text
    cancelled = response.json()
    assert 2 <= cancelled["expires_at"] - cancelled["completed_at"] <= 3, cancelled

    completed = wait_finished(ttl_server, completed_id)
    assert completed["status"] == "completed", completed
    assert 2 <= completed["expires_at"] - completed["completed_at"] <= 3, completed
    assert (videos / completed_id / "video.mp4").is_file()

    # The purge runs every min(30 s, ttl) = 2 s.
    wait_for(
        lambda: not {completed_id, cancelled_id} & set(list_ids(ttl_server)),
        timeout=40,
        interval=0.25,
        what="the expired jobs to leave the list",
    )
    assert not (videos / completed_id).exists()
    assert not (videos / cancelled_id).exists()
    error_of(httpx.get(videos_url(ttl_server, f"/{completed_id}"), timeout=30), 404)
    error_of(httpx.get(videos_url(ttl_server, f"/{completed_id}/content"), timeout=30), 404)


# --- persistence across a kill -9 (last: it kills the shared server) --------------------------------------


def test_jobs_survive_a_kill_9_restart(
    server: Server, wan_dir: Path, output_dirs: dict[str, Path], tmp_path: Path
) -> None:
    first = server
    done = create(first, **FAST, seed=1)
    assert wait_finished(first, done["id"])["status"] == "completed"
    original = content(first, done["id"])
    running = create(first, **SLOW, seed=2)
    wait_running(first, running["id"])
    queued = create(first, **FAST, seed=3)
    assert get_job(first, queued["id"])["status"] == "queued"
    assert get_job(first, running["id"])["status"] == "in_progress"
    listed = list_ids(first, order="asc")
    assert listed[-3:] == [done["id"], running["id"], queued["id"]], listed

    first.proc.kill()
    first.proc.wait(timeout=30)

    second = launch_server(wan_dir, "--output-dir", str(output_dirs["server"]), log_dir=tmp_path)
    try:
        second.wait_ready(READY_TIMEOUT)
        assert list_ids(second, order="asc") == listed

        # The finished job is served again, byte for byte.
        kept = get_job(second, done["id"])
        assert kept["status"] == "completed" and kept["progress"] == 100, kept
        assert content(second, done["id"]) == original
        assert_video(original, frames=9, fps=8)

        # The queued one runs, with the seed it was given.
        rerun = wait_finished(second, queued["id"])
        assert rerun["status"] == "completed" and rerun["seed"] == 3, rerun
        assert_video(content(second, queued["id"]), frames=9, fps=8)

        # The running one died with the process.
        failed = get_job(second, running["id"])
        assert failed["status"] == "failed", failed
        assert failed["error"]["code"] == "server_restarted" and failed["error"]["message"], failed
        error_of(httpx.get(videos_url(second, f"/{running['id']}/content"), timeout=30), 404)
        # Like every other finished job it is stamped and expires (else its record is never purged).
        assert failed["completed_at"] is not None and failed["expires_at"] is not None, failed
    finally:
        second.stop()
