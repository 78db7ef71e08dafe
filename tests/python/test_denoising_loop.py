"""The engine's denoising loop, guiders, loop hooks and pipeline spec, on a toy family (no checkpoint),
plus the hook seam on the FLUX fixture."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from sgl_diffusion.pipelines.base import BatchState
from sgl_diffusion.pipelines.conditioning import Conditioning, ModelInputs
from sgl_diffusion.pipelines.family import FamilyAdapter, FamilyPipeline
from sgl_diffusion.pipelines.guidance import (
    ClassifierFreeGuidance,
    ConditionalOffsetCFG,
    NoGuidance,
    NormPreservingCFG,
)
from sgl_diffusion.pipelines.hooks import LoopHooks, StepContext
from sgl_diffusion.pipelines.spec import PipelineLimits, PipelineSpec, SamplingDefaults
from sgl_diffusion.pipelines.text_lengths import TEXT_LENGTHS, ByTextLength, pad_text_rows
from sgl_diffusion.runtime.options import RuntimeOptions
from sgl_diffusion.runtime.request import Request
from sgl_diffusion.schedulers import FlowMatchEulerScheduler
from sgl_diffusion.schedulers.dmd import DmdState
from sgl_diffusion.schedulers.flow_match_euler import FlowMatchEulerState, euler_step

#: The toy's high-noise expert runs while the timestep is at least this, then the low-noise one.
BOUNDARY = 600.0


class ToyDenoiser(torch.nn.Module):
    """A row-wise "denoiser": each row's output depends on that row's inputs only, and on the prompt."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        self.gain = gain

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        return self.gain * hidden_states + encoder_hidden_states.view(-1, 1, 1) * timestep.view(-1, 1, 1) / 1000

    @staticmethod
    def tokens_per_sample(hidden_states: torch.Tensor) -> int:
        return int(hidden_states.shape[1])


class ToyAdapter(FamilyAdapter):
    """Two experts, CFG with a per-expert scale, flow-match Euler; the latents are the "images"."""

    def __init__(self) -> None:
        self.scheduler = FlowMatchEulerScheduler.from_config({"shift": 3.0})
        self.denoisers = [ToyDenoiser(0.9), ToyDenoiser(-0.4)]
        self.selected: list[list[bool]] = []

    def encode_prompts(
        self, texts: list[str], max_sequence_length: int, device: torch.device, owners: Sequence[Request] = ()
    ) -> dict[str, torch.Tensor]:
        return {"encoder_hidden_states": torch.tensor([float(len(text)) for text in texts], device=device)}

    def cfg_scales(self, rows: Sequence[Request], device: torch.device) -> tuple[torch.Tensor, ...]:
        first = torch.tensor([r.guidance_scale for r in rows], device=device)
        second = torch.tensor([r.guidance_scale_2 or r.guidance_scale for r in rows], device=device)
        return first, second

    def initial_latents(self, state: BatchState) -> torch.Tensor:
        from sgl_diffusion.pipelines.latents import draw_noise

        return draw_noise(state.requests, (4, 3)).to(state.device)

    def sampler(self, state: BatchState) -> FlowMatchEulerState:
        adapter = self

        class Recording(FlowMatchEulerState):
            def select(self, rows: torch.Tensor | Sequence[int]) -> None:
                adapter.selected.append(torch.as_tensor(rows).tolist())

        timesteps, sigmas = self.scheduler.plan(state.requests[0].num_inference_steps)
        return Recording(timesteps, sigmas)

    @property
    def experts(self) -> list[torch.nn.Module]:
        return self.denoisers

    def expert_for(self, timestep: torch.Tensor) -> int:
        return 0 if bool(timestep >= BOUNDARY) else 1

    def model_inputs(self, state: BatchState, latents: torch.Tensor, timestep: torch.Tensor) -> ModelInputs:
        return ModelInputs(rows={"hidden_states": latents, "timestep": timestep.expand(latents.shape[0])})

    def decode(self, state: BatchState) -> np.ndarray:
        return state["latents"].numpy()


SPEC = PipelineSpec(
    pipeline_class="ToyPipeline",
    family="toy",
    task="text-to-image",
    guidance_mode="classifier_free",
    limits=PipelineLimits(16, 16, 64, 4096, 1, "single", 32, 1000, 16),
    defaults=SamplingDefaults(width=32, height=32, num_inference_steps=6, guidance_scale=4.0, max_sequence_length=8),
)


class ToyPipeline(FamilyPipeline):
    pipeline_class = "ToyPipeline"

    def __init__(self, cfg_batching: str = "auto") -> None:
        super().__init__(SPEC, ToyAdapter(), RuntimeOptions.for_device("cpu", cfg_batching=cfg_batching))

    @classmethod
    def load(cls, model_dir: Path, options: RuntimeOptions, defaults: SamplingDefaults | None) -> ToyPipeline:
        raise NotImplementedError("the toy pipeline has no checkpoint")


def request(index: int, prompt: str, seed: int, **fields: object) -> Request:
    base = {
        "negative_prompt": "blurry", "width": 32, "height": 32, "num_frames": 1, "num_inference_steps": 6,
        "guidance_scale": 4.0, "true_cfg_scale": 1.0, "max_sequence_length": 8, "num_outputs": 1,
        "flow_shift": None, "guidance_scale_2": 2.0, "fps": None, "image_path": None, "cfg_enabled": True,
        "output_format": "npy", "output_quality": None, "notes": (),
    }  # fmt: skip
    return Request(id=index, prompt=prompt, seed=seed, **{**base, **fields})


def never_cancel(step: int, total: int) -> list[int]:
    return []


def written_out_loop(req: Request) -> torch.Tensor:
    """The toy request denoised by a loop written out by hand: expert by boundary, CFG with that expert's
    scale, an Euler step."""
    adapter = ToyAdapter()
    latents = torch.randn((req.num_outputs, 4, 3), generator=torch.Generator("cpu").manual_seed(req.seed))
    timesteps, sigmas = adapter.scheduler.plan(req.num_inference_steps)
    positive, negative = float(len(req.prompt)), float(len(req.negative_prompt or ""))
    for i, t in enumerate(timesteps):
        high = bool(t >= BOUNDARY)
        model = adapter.denoisers[0 if high else 1]
        timestep = t.expand(latents.shape[0])
        text = torch.full((latents.shape[0],), positive)
        cond = model(latents, timestep, text)
        if req.cfg_enabled:
            uncond = model(latents, timestep, torch.full((latents.shape[0],), negative))
            scale = req.guidance_scale if high else req.guidance_scale_2
            cond = uncond + scale * (cond - uncond)
        latents = euler_step(latents, cond, sigmas[i], sigmas[i + 1])
    return latents


@pytest.mark.parametrize("cfg_batching", ["on", "off"])
@pytest.mark.parametrize("cfg", [True, False])
def test_the_loop_is_a_written_out_guided_loop(cfg_batching: str, cfg: bool) -> None:
    req = request(0, "a cat", 3, num_outputs=2, cfg_enabled=cfg)
    state = ToyPipeline(cfg_batching).run([req], never_cancel)
    # The toy's arithmetic is elementwise: batching the branches changes no bit.
    torch.testing.assert_close(state["latents"], written_out_loop(req), rtol=0, atol=0)
    assert isinstance(state["images"], np.ndarray)


def test_hooks_see_every_step_and_its_expert_before_progress_is_reported() -> None:
    events: list[tuple[str, int]] = []
    steps: list[StepContext] = []

    class Recorder:
        def step_start(self, step: StepContext) -> None:
            events.append(("start", step.index))
            steps.append(step)

        def step_inputs(self, step: StepContext, inputs: object, row_owner: torch.Tensor) -> None:
            events.append(("inputs", step.index))

        def step_end(self, step: StepContext) -> None:
            events.append(("end", step.index))

    def progress(step: int, total: int) -> list[int]:
        events.append(("progress", step))
        return []

    plain = ToyPipeline().run([request(0, "a cat", 3)], never_cancel)["latents"]
    pipeline = ToyPipeline()
    pipeline.hooks.add(Recorder())
    hooked = pipeline.run([request(0, "a cat", 3)], progress)["latents"]
    assert torch.equal(hooked, plain)  # a hook that only watches changes nothing
    assert events == [
        event for i in range(6) for event in (("start", i), ("inputs", i), ("end", i), ("progress", i + 1))
    ]
    assert [s.total for s in steps] == [6] * 6
    experts = [s.expert for s in steps]
    assert experts == [0 if bool(s.timestep >= BOUNDARY) else 1 for s in steps] and set(experts) == {0, 1}


def test_a_hook_must_have_every_point() -> None:
    class Half:
        def step_start(self, step: StepContext) -> None: ...

    with pytest.raises(TypeError, match="step_start, step_inputs and step_end"):
        LoopHooks().add(Half())  # type: ignore[arg-type]


def test_cancelled_rows_leave_the_state_the_conditioning_and_the_sampler() -> None:
    requests = [request(0, "a cat", 1), request(1, "a dog", 2, num_outputs=2), request(2, "a fox", 3)]

    def cancel_dog_after_two_steps(step: int, total: int) -> list[int]:
        return [1] if step >= 2 else []

    pipeline = ToyPipeline()
    state = pipeline.run(requests, cancel_dog_after_two_steps)
    assert state.active == [0, 2] and state.row_owner.tolist() == [0, 2]
    assert state["conditioning"].num_rows == 2 and len(state["conditioning"].cfg_scales[1]) == 2
    assert pipeline.adapter.selected == [[True, False, False, True]]  # told once, when the dog left
    for row, req in zip(state["latents"], (requests[0], requests[2]), strict=True):
        torch.testing.assert_close(row, written_out_loop(req)[0], rtol=0, atol=0)


def test_guiders_against_their_formulas() -> None:
    generator = torch.Generator().manual_seed(0)
    positive, negative = torch.randn(3, 5, 8, generator=generator), torch.randn(3, 5, 8, generator=generator)
    scale = torch.tensor([1.0, 4.0, 7.5])
    cfg = ClassifierFreeGuidance(batched=True).combine(positive, negative, scale)
    direct = negative + scale[:, None, None] * (positive - negative)
    torch.testing.assert_close(cfg, direct, rtol=0, atol=0)
    # diffusers' QwenImagePipeline true CFG, written out.
    combined = negative + scale[:, None, None] * (positive - negative)
    rescaled = combined * (torch.norm(positive, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
    ours = NormPreservingCFG(batched=False).combine(positive, negative, scale)
    torch.testing.assert_close(ours, rescaled, rtol=0, atol=0)
    torch.testing.assert_close(ours.norm(dim=-1), positive.norm(dim=-1))  # each token keeps cond's norm
    assert (ours - cfg).abs().max() > 0.1
    # A float32 scale is cast to a bf16 prediction's dtype before it multiplies (no promotion to float32).
    half = ClassifierFreeGuidance(batched=True).combine(positive.bfloat16(), negative.bfloat16(), scale)
    assert half.dtype == torch.bfloat16


def test_guiders_run_one_forward_per_branch_or_one_for_both() -> None:
    calls: list[int] = []

    def denoiser(hidden_states: torch.Tensor, text: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
        calls.append(hidden_states.shape[0])
        assert extra is not None and extra.shape[0] == hidden_states.shape[0]  # shared inputs follow the rows
        return hidden_states * text.view(-1, 1)

    conditioning = Conditioning(
        positive={"text": torch.tensor([2.0, 3.0])},
        negative={"text": torch.tensor([1.0, 1.0])},
        shared={"extra": torch.zeros(2)},
        cfg_scales=(torch.tensor([5.0, 5.0]), torch.tensor([2.0, 0.5])),
    )
    inputs = ModelInputs(rows={"hidden_states": torch.ones(2, 3)})
    batched = ClassifierFreeGuidance(batched=True).predict(denoiser, inputs, conditioning, expert=1)
    split = ClassifierFreeGuidance(batched=False).predict(denoiser, inputs, conditioning, expert=1)
    plain = NoGuidance().predict(denoiser, inputs, conditioning, expert=1)
    assert calls == [4, 2, 2, 2]
    torch.testing.assert_close(batched, split, rtol=0, atol=0)
    torch.testing.assert_close(batched[:, 0], torch.tensor([1 + 2.0 * 1, 1 + 0.5 * 2]))  # expert 1's scales
    torch.testing.assert_close(plain[:, 0], torch.tensor([2.0, 3.0]))


def test_conditional_only_inputs_reach_only_the_conditional_forward() -> None:
    """`ModelInputs.cond_only` (GLM-Image's input-image keys and values): the conditional forward gets them,
    the unconditional one does not, and a guider that would stack the branches runs them apart."""
    calls: list[tuple[int, bool]] = []

    def denoiser(hidden_states: torch.Tensor, text: torch.Tensor, memory: list[torch.Tensor] | None = None):
        calls.append((hidden_states.shape[0], memory is not None))
        return hidden_states * text.view(-1, 1) + (0.0 if memory is None else memory[0])

    conditioning = Conditioning(
        positive={"text": torch.tensor([2.0, 3.0])},
        negative={"text": torch.tensor([1.0, 1.0])},
        cfg_scales=(torch.tensor([4.0, 4.0]),),
    )
    inputs = ModelInputs(rows={"hidden_states": torch.ones(2, 3)}, cond_only={"memory": [torch.full((3,), 10.0)]})
    expected_cfg = 1 + 4.0 * (torch.tensor([2.0, 3.0]) + 10.0 - 1)  # uncond 1 + 4 * (cond - uncond)
    for batched in (True, False):
        calls.clear()
        guided = ClassifierFreeGuidance(batched=batched).predict(denoiser, inputs, conditioning, expert=0)
        assert calls == [(2, True), (2, False)]
        torch.testing.assert_close(guided[:, 0], expected_cfg)
    calls.clear()
    plain = NoGuidance().predict(denoiser, inputs, conditioning, expert=0)
    assert calls == [(2, True)]
    torch.testing.assert_close(plain[:, 0], torch.tensor([12.0, 13.0]))
    # Z-Image's guider too, on the steps it guides and on those it does not.
    guidance = {"active": torch.tensor([True, True]), "normalization": torch.zeros(2)}
    for active in (True, False):
        calls.clear()
        step = dataclasses.replace(inputs, guidance={**guidance, "active": torch.tensor([active, active])})
        ConditionalOffsetCFG(batched=True).predict(denoiser, step, conditioning, expert=0)
        assert calls == ([(2, True), (2, False)] if active else [(2, True)])


def test_rows_of_one_text_length_run_together_without_padding() -> None:
    calls: list[tuple[int, int]] = []

    def denoiser(hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, layout: str) -> torch.Tensor:
        assert layout == "fixed"  # inputs that are no tensors reach every group unchanged
        calls.append(tuple(encoder_hidden_states.shape[:2]))
        assert encoder_hidden_states.is_contiguous() and encoder_hidden_states.abs().min() > 0  # no padding
        return hidden_states * encoder_hidden_states.sum(dim=(1, 2)).view(-1, 1)

    texts = [torch.full((length, 2), float(length)) for length in (3, 1, 3, 2)]
    padded, lengths = pad_text_rows(texts)
    assert padded.shape == (4, 3, 2) and lengths.tolist() == [3, 1, 3, 2] and lengths.device.type == "cpu"
    hidden = torch.arange(1.0, 5.0).view(4, 1)
    inputs = {"hidden_states": hidden, "encoder_hidden_states": padded, TEXT_LENGTHS: lengths, "layout": "fixed"}
    out = ByTextLength(denoiser)(**inputs)
    assert calls == [(2, 3), (1, 1), (1, 2)]  # one forward per length, in order of first appearance
    torch.testing.assert_close(out[:, 0], torch.tensor([1 * 18.0, 2 * 2.0, 3 * 18.0, 4 * 8.0]))
    calls.clear()
    same, same_lengths = pad_text_rows([torch.ones(2, 2)] * 4)
    longer = torch.cat([same, torch.zeros(4, 1, 2)], dim=1)  # padded past every row's length
    ByTextLength(denoiser)(**{**inputs, "encoder_hidden_states": longer, TEXT_LENGTHS: same_lengths})
    assert calls == [(4, 2)]  # one length: one forward over all rows, cut to it
    with pytest.raises(ValueError, match="hidden_states"):
        ByTextLength(denoiser)(**{**inputs, "hidden_states": hidden[:2]})


def test_rows_of_one_length_bucket_run_together_with_their_own_lengths() -> None:
    """With a bucket (Z-Image: the model pads captions to a multiple of 32 itself), rows whose lengths share a
    bucket run as one forward, cut to the group's longest row, and the forward learns each row's length."""
    calls: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def denoiser(hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, lengths: tuple[int, ...]):
        calls.append((tuple(encoder_hidden_states.shape[:2]), lengths))
        return hidden_states * torch.tensor(lengths, dtype=hidden_states.dtype).view(-1, 1)

    padded, lengths = pad_text_rows([torch.ones(n, 2) for n in (5, 40, 3, 33)])
    hidden = torch.ones(4, 1)
    inputs = {"hidden_states": hidden, "encoder_hidden_states": padded, TEXT_LENGTHS: lengths}
    by_bucket = ByTextLength(denoiser, bucket=lambda n: -(-n // 32), lengths_key="lengths")
    out = by_bucket(**inputs)
    assert calls == [((2, 5), (5, 3)), ((2, 40), (40, 33))]
    torch.testing.assert_close(out[:, 0], torch.tensor([5.0, 40.0, 3.0, 33.0]))
    with pytest.raises(ValueError, match="go together"):
        ByTextLength(denoiser, bucket=lambda n: n)


def test_dmd_state_renoises_from_each_requests_own_generator_and_drops_cancelled_ones() -> None:
    generators = [torch.Generator().manual_seed(seed) for seed in (1, 2)]
    state = DmdState((1000, 500), (1.0, 0.5), generators, outputs=[1, 2], device=torch.device("cpu"))
    sample, flow = torch.ones(3, 2), torch.full((3, 2), 0.25)
    after = state.step(flow, sample)
    replay = [torch.Generator().manual_seed(seed) for seed in (1, 2)]
    noise = torch.cat([torch.randn((1, 2), generator=replay[0]), torch.randn((2, 2), generator=replay[1])])
    torch.testing.assert_close(after, 0.5 * (sample - 1.0 * flow) + 0.5 * noise, rtol=0, atol=0)
    state.select(torch.tensor([False, True, True]))  # request 0 left; its generator must not be drawn from
    last = state.step(flow[1:], after[1:])
    torch.testing.assert_close(last, after[1:] - 0.5 * flow[1:], rtol=0, atol=0)
    assert [generator for generator, _ in state.requests] == [generators[1]]


def test_the_spec_refuses_unknown_values_and_speaks_rusts_names() -> None:
    with pytest.raises(ValueError, match="guidance_mode must be one of classifier_free, embedded_with_true_cfg"):
        dataclasses.replace(SPEC, guidance_mode="cfg")
    with pytest.raises(ValueError, match="image_input must be one of none, optional, required, got 'maybe'"):
        dataclasses.replace(SPEC, image_input="maybe")
    with pytest.raises(ValueError, match="names no request field: \\['resolution'\\]"):
        dataclasses.replace(SPEC, extra_batch_key_fields=("resolution",))
    with pytest.raises(ValueError, match="max_input_images must be at least 1, got 0"):
        dataclasses.replace(SPEC, max_input_images=0)
    info = dataclasses.replace(SPEC, extra_batch_key_fields=("fps",), max_input_images=3).info_fields()
    # The names `sgl_core::PipelineInfo` reads (it denies unknown fields).
    assert info["extra_batch_key_fields"] == ["fps"] and info["guidance"] == "classifier_free"
    assert info["max_input_images"] == 3 and info["defaults"]["size_from_inputs"] is None
    assert SPEC.output_key == "images" and dataclasses.replace(SPEC, output="video").output_key == "videos"
    with pytest.raises(dataclasses.FrozenInstanceError):
        SPEC.task = "text-to-video"  # type: ignore[misc]


def test_a_counting_hook_on_the_flux_pipeline(flux_dir: Path) -> None:
    """The seam on a real family: a hook attached to FLUX's loop sees each step once, and each step is one
    transformer forward (true CFG's two branches batched)."""
    from sgl_diffusion.pipelines.flux import FluxPipeline

    class CountSteps:
        def __init__(self) -> None:
            self.started = self.ended = 0

        def step_start(self, step: StepContext) -> None:
            self.started += 1

        def step_inputs(self, step: StepContext, inputs: object, row_owner: torch.Tensor) -> None: ...

        def step_end(self, step: StepContext) -> None:
            self.ended += 1

    pipeline = FluxPipeline.load(flux_dir, RuntimeOptions.for_device("cpu"), None)
    forwards: list[int] = []
    pipeline.c.transformer.register_forward_hook(
        lambda module, args, kwargs, out: forwards.append(out.shape[0]), with_kwargs=True
    )
    counter = CountSteps()
    pipeline.hooks.add(counter)
    req = request(
        0, "a cat", 1, negative_prompt="blurry", true_cfg_scale=4.0, num_inference_steps=3, max_sequence_length=16
    )
    pipeline.run([req], never_cancel)
    assert (counter.started, counter.ended) == (3, 3)
    assert forwards == [2, 2, 2]
