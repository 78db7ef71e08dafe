"""The scheduler seen from Python: batching, per-request noise, fault isolation, cancellation."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

from conftest import SMALL
from sgl_diffusion import InvalidRequestError, RequestCancelledError
from sgl_diffusion.api import collect
from sgl_diffusion.pipelines import flux

#: A request's image alone and inside a batch, fp32 CPU (pixels in [0, 1]): each request draws its noise
#: from its own generator, so batching changes nothing but the rounding of batch-4 instead of batch-1
#: products. That is not bit-exact even single-threaded (BLAS blocks other shapes differently):
#: measured 9.5e-7 to 1.1e-6. The bound sits just above.
ALONE_VS_BATCHED_ATOL = 1e-5

REQUESTS = [
    {"prompt": "a photo of a cat", "seed": 1, "guidance_scale": 3.5},
    {"prompt": "a red fox in the snow", "seed": 2, "guidance_scale": 1.0},
    {"prompt": "dance monkey", "seed": 3, "guidance_scale": 7.0},
    {"prompt": "a lighthouse at dawn", "seed": 4, "guidance_scale": 5.0},
]


def submit(gen, **fields):
    return gen.submit(**{**SMALL, "output_format": "npy", **fields})


def test_compatible_requests_share_a_batch_and_match_running_alone(batching_generator, generator) -> None:
    handles = [submit(batching_generator, **fields) for fields in REQUESTS]
    batched = [collect(handle) for handle in handles]
    for fields, result in zip(REQUESTS, batched, strict=True):
        alone = generator.generate(**SMALL, output_type="np", **fields)
        assert result.batch_size == 4
        np.testing.assert_allclose(result.images[0], alone.images[0], rtol=0, atol=ALONE_VS_BATCHED_ATOL)
        assert result.seed == fields["seed"]


def test_incompatible_requests_do_not_share_a_batch(batching_generator) -> None:
    square = submit(batching_generator, prompt="a cat", seed=1)
    tall = submit(batching_generator, prompt="a cat", seed=1, height=48)
    for handle in (square, tall):
        _, metadata = handle.wait()
        assert json.loads(metadata)["batch_size"] == 1


def test_a_failing_request_does_not_fail_its_neighbours(batching_generator, monkeypatch) -> None:
    # Inject a fault into the text encoder for one prompt: the batch fails, the scheduler retries
    # each request alone, and only the faulty one reports an error.
    original = flux.FluxAdapter.encode_texts

    def faulty(self, texts, seq_len, device):
        if any("explode" in text for text in texts):
            raise RuntimeError("injected text-encoder fault")
        return original(self, texts, seq_len, device)

    monkeypatch.setattr(flux.FluxAdapter, "encode_texts", faulty)
    handles = [
        submit(batching_generator, prompt="a cat", seed=1),
        submit(batching_generator, prompt="please explode", seed=2),
        submit(batching_generator, prompt="a dog", seed=3),
    ]
    assert collect(handles[0]).images[0].shape == (32, 32, 3)
    with pytest.raises(Exception, match="injected text-encoder fault"):
        collect(handles[1])
    assert collect(handles[2]).images[0].shape == (32, 32, 3)


def test_a_running_request_stops_between_steps(generator) -> None:
    handle = submit(generator, prompt="a cat", seed=1, num_inference_steps=500)
    steps_seen: list[int] = []

    def on_progress(step: int, total: int) -> None:
        steps_seen.append(step)
        if step == 2:
            handle.cancel()

    with pytest.raises(RequestCancelledError):
        handle.wait(on_progress)
    assert steps_seen[-1] < 10  # stopped right after the cancel, not after 500 steps


def test_a_cancelled_request_inside_a_batch_spares_the_others(batching_generator, generator) -> None:
    slow = {"num_inference_steps": 60}
    victim = submit(batching_generator, prompt="a cat", seed=1, **slow)
    survivor = submit(batching_generator, prompt="a dog", seed=2, **slow)
    cancelled = threading.Event()

    def cancel_at_step_3(step: int, total: int) -> None:
        if step == 3 and not cancelled.is_set():
            victim.cancel()
            cancelled.set()

    with pytest.raises(RequestCancelledError):
        victim.wait(cancel_at_step_3)
    result = collect(survivor)
    alone = generator.generate("a dog", seed=2, output_type="np", **{**SMALL, **slow})
    np.testing.assert_allclose(result.images[0], alone.images[0], rtol=0, atol=ALONE_VS_BATCHED_ATOL)


def test_a_queued_request_can_be_cancelled(generator) -> None:
    running = submit(generator, prompt="a cat", seed=1, num_inference_steps=200)
    queued = submit(generator, prompt="a dog", seed=2)
    queued.cancel()
    with pytest.raises(RequestCancelledError):
        queued.wait()
    running.cancel()
    with pytest.raises(RequestCancelledError):
        running.wait()


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "a", "num_outputs_per_prompt": 0}, "num_outputs_per_prompt"),
        ({"prompt": "a", "num_outputs_per_prompt": 11}, "num_outputs_per_prompt"),
        ({"prompt": "a", "num_inference_steps": 0}, "num_inference_steps"),
        ({"prompt": "a", "guidance_scale": -1.0}, "guidance_scale"),
        ({"prompt": "a", "width": 40}, "width"),
        ({"prompt": "a", "height": 8}, "height"),
        ({"prompt": "a", "negative_prompt": "ugly"}, "negative_prompt"),
        ({"prompt": "a", "true_cfg_scale": 4.0}, "true_cfg_scale"),
        ({"prompt": "a", "max_sequence_length": 513}, "max_sequence_length"),
        ({"prompt": "a", "num_frames": 9}, "num_frames"),
        ({"prompt": "x" * 10_001}, "prompt"),
        ({"prompt": "a", "seed": -1}, "seed"),
    ],
)
def test_invalid_requests_name_their_field(generator, fields: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        generator.generate(**fields)
    assert info.value.field == field
    assert field in str(info.value)


def test_the_engine_keeps_serving_after_errors(generator) -> None:
    with pytest.raises(InvalidRequestError):
        generator.generate("a", num_inference_steps=0)
    assert generator.generate("a", seed=0, **SMALL).images[0].size == (32, 32)
