"""FastWan (DMD) against diffusers' Wan transformer and VAE inside a reference DMD loop written here.

diffusers has no DMD pipeline, so the oracle is FastVideo's `DmdDenoisingStage` algorithm written out
below with diffusers' components: at each fixed timestep the DiT's flow prediction gives the clean
latent, which is re-noised with fresh noise (the same CPU generator, continued) to the next timestep.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from sgl_diffusion import DiffGenerator, InvalidRequestError
from sgl_diffusion.api import collect
from sgl_diffusion.testing import build_fixture

FASTWAN21_ID = "FastVideo/FastWan2.1-T2V-1.3B-Diffusers"
DMD_TIMESTEPS = [1000, 757, 522]
#: 9 frames of 32x32, 16 text tokens: a few tenths of a second per run on 2 CPU cores.
TINY = {"height": 32, "width": 32, "num_frames": 9, "max_sequence_length": 16}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny Wan fixtures (references) and the copies the engine loads as FastWan:

    * `fastwan21`: wan21_t2v in a fake Hugging Face cache under FastWan2.1's id (folder untouched,
      still a `WanPipeline`): the id alone selects DMD.
    * `fastwan22`: wan22_ti2v_5b with `_class_name: WanDMDPipeline`, as FastVideo's folders ship it.
    """
    root = tmp_path_factory.mktemp("fastwan")
    wan21 = build_fixture("wan21_t2v", root / "wan21_t2v")
    wan22 = build_fixture("wan22_ti2v_5b", root / "wan22_ti2v_5b")
    repo = root / "hub" / ("models--" + FASTWAN21_ID.replace("/", "--"))
    shutil.copytree(wan21, repo / "snapshots" / "x")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("x")
    marked = root / "fastwan22"
    shutil.copytree(wan22, marked)
    index = json.loads((marked / "model_index.json").read_text())
    index["_class_name"] = "WanDMDPipeline"
    (marked / "model_index.json").write_text(json.dumps(index))
    return {"wan21_t2v": wan21, "wan22_ti2v_5b": wan22, "hub": root / "hub", "fastwan22": marked}


def load(folders: dict[str, Path], which: str, **engine: object) -> DiffGenerator:
    if which == "fastwan22":
        return DiffGenerator.from_pretrained(folders["fastwan22"], device="cpu", **engine)
    with pytest.MonkeyPatch.context() as patch:
        # The id is resolved (in the local cache only) when the engine loads.
        patch.setenv("HF_HUB_CACHE", str(folders["hub"]))
        return DiffGenerator.from_pretrained(FASTWAN21_ID, device="cpu", **engine)


@pytest.fixture(scope="module")
def fastwan21(folders: dict[str, Path]) -> Iterator[DiffGenerator]:
    gen = load(folders, "fastwan21")
    yield gen
    gen.shutdown()


def table_sigma(t: int) -> float:
    """FastVideo's lookup: the sigma whose shifted timestep in a shift-8 flow-match table is nearest t."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    table = FlowMatchEulerDiscreteScheduler(shift=8.0)
    return float(table.sigmas[torch.argmin((table.timesteps.double() - t).abs())])


def reference_dmd(folder: Path, prompt: str, seed: int) -> np.ndarray:
    """The DMD loop with diffusers' WanTransformer3DModel and AutoencoderKLWan, text embeddings from
    WanPipeline.encode_prompt; frames (T, H, W, 3) in [0, 1]."""
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(folder)
    transformer, vae = pipe.transformer, pipe.vae
    with torch.no_grad():
        embeds, _ = pipe.encode_prompt(
            prompt, do_classifier_free_guidance=False, max_sequence_length=TINY["max_sequence_length"], device="cpu"
        )
        scale = vae.config.scale_factor_spatial
        latent_frames = (TINY["num_frames"] - 1) // vae.config.scale_factor_temporal + 1
        shape = (1, vae.config.z_dim, latent_frames, TINY["height"] // scale, TINY["width"] // scale)
        generator = torch.Generator("cpu").manual_seed(seed)
        latents = torch.randn(shape, generator=generator)
        patch = transformer.config.patch_size
        tokens = latent_frames * (shape[3] // patch[1]) * (shape[4] // patch[2])
        for i, t in enumerate(DMD_TIMESTEPS):
            # TI2V-5B (expand_timesteps) takes one timestep per video token, as WanPipeline passes it.
            timestep = torch.full((1, tokens), float(t)) if pipe.config.expand_timesteps else torch.tensor([t])
            flow = transformer(latents, timestep=timestep, encoder_hidden_states=embeds, return_dict=False)[0]
            clean = latents - table_sigma(t) * flow
            if i + 1 < len(DMD_TIMESTEPS):
                sigma_next = table_sigma(DMD_TIMESTEPS[i + 1])
                latents = (1 - sigma_next) * clean + sigma_next * torch.randn(shape, generator=generator)
            else:
                latents = clean
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
        video = vae.decode(latents / (1.0 / std) + mean, return_dict=False)[0]
    return (video * 0.5 + 0.5).clamp(0, 1)[0].permute(1, 2, 3, 0).numpy()


def test_sigmas_are_fastvideos_table_lookup() -> None:
    from sgl_diffusion.pipelines.fastwan import dmd_sigmas

    assert dmd_sigmas() == [table_sigma(t) for t in DMD_TIMESTEPS]
    assert dmd_sigmas()[0] == 1.0  # the first step starts from pure noise


@pytest.mark.parametrize(
    ("which", "reference", "defaults"),
    [
        ("fastwan21", "wan21_t2v", (832, 480, 81, 16)),  # selected by its Hugging Face id
        ("fastwan22", "wan22_ti2v_5b", (1280, 704, 121, 24)),  # selected by `_class_name: WanDMDPipeline`
    ],
)
def test_fastwan_matches_a_reference_dmd_loop(
    folders: dict[str, Path], fastwan21: DiffGenerator, which: str, reference: str, defaults: tuple
) -> None:
    gen = fastwan21 if which == "fastwan21" else load(folders, which)
    try:
        info = gen.info
        assert info["pipeline_class"] == "WanDMDPipeline" and info["task"] == "text-to-video"
        d = info["defaults"]
        assert (d["width"], d["height"], d["num_frames"], d["fps"]) == defaults
        assert (d["num_inference_steps"], d["guidance_scale"]) == (3, 1.0)
        ours = gen.generate("a cat dancing in the rain", seed=11, output_type="np", **TINY)
        other = gen.generate("a dragon flying over a medieval castle", seed=11, output_type="np", **TINY)
    finally:
        if gen is not fastwan21:
            gen.shutdown()
    expected = reference_dmd(folders[reference], "a cat dancing in the rain", 11)
    assert ours.frames[0].shape == expected.shape == (9, 32, 32, 3)
    # Frames in [0, 1], fp32 CPU: our Wan DiT is not op-for-op diffusers' order, so the last bits
    # differ (measured 6.3e-7). The bound stays 50x below what sigma = t / 1000 instead of the table
    # lookup would change (measured 5.0e-4 to 9.4e-4), so it checks the sampler, not just the components.
    assert np.abs(ours.frames[0] - expected).max() <= 1e-5
    # The prompt acts (measured 0.09 to 0.11 max abs): dropping it could not pass as matching.
    assert np.abs(other.frames[0] - ours.frames[0]).max() > 1e-2


def test_three_steps_are_three_dit_calls_at_the_dmd_timesteps(fastwan21: DiffGenerator, monkeypatch) -> None:
    from sgl_diffusion.models.wan import WanTransformer3DModel

    seen: list[list[int]] = []
    original = WanTransformer3DModel.forward

    def counting(self, hidden_states, timestep, *args, **kwargs):
        seen.append(torch.as_tensor(timestep).flatten().tolist())
        return original(self, hidden_states, timestep, *args, **kwargs)

    monkeypatch.setattr(WanTransformer3DModel, "forward", counting)
    fastwan21.generate("a cat", seed=1, **TINY)
    assert seen == [[t] for t in DMD_TIMESTEPS]  # one forward per step: no CFG branch


def test_a_request_is_the_same_alone_and_in_a_batch(folders: dict[str, Path], fastwan21: DiffGenerator) -> None:
    fields = [{"prompt": "a cat", "seed": 3}, {"prompt": "a red fox in the snow", "seed": 4}]
    batching = load(folders, "fastwan21", max_batch_size=2, batch_delay_ms=2000)
    try:
        handles = [batching.submit(**TINY, output_format="npy", **f) for f in fields]
        batched = [collect(handle) for handle in handles]
    finally:
        batching.shutdown()
    for f, result in zip(fields, batched, strict=True):
        assert result.batch_size == 2
        alone = fastwan21.generate(**TINY, output_type="np", **f)
        # Each request's fresh noise comes from its own generator: batching changes nothing but the
        # rounding of batch-2 instead of batch-1 products (measured 6.0e-7; not bit-exact, as BLAS
        # blocks other shapes differently).
        np.testing.assert_allclose(result.frames[0], alone.frames[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"num_inference_steps": 4}, "num_inference_steps"),
        ({"num_inference_steps": 1}, "num_inference_steps"),
        ({"guidance_scale": 5.0}, "guidance_scale"),
        ({"negative_prompt": "blurry"}, "negative_prompt"),
        ({"flow_shift": 5.0}, "flow_shift"),
    ],
)
def test_what_dmd_cannot_honour_is_an_error(fastwan21: DiffGenerator, fields: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        fastwan21.generate("a cat", seed=1, **TINY, **fields)
    assert info.value.field == field
    if field == "num_inference_steps":
        assert "must be 3" in str(info.value)


@pytest.mark.parametrize(
    ("hf_id", "fixture", "defaults"),
    [
        ("FastVideo/FastWan2.1-T2V-14B-480P-Diffusers", "wan21_t2v", (832, 480, 81, 16)),
        ("FastVideo/FastWan2.1-T2V-14B-Diffusers", "wan21_t2v", (832, 480, 81, 16)),
        ("FastVideo/FastWan2.2-TI2V-5B-Diffusers", "wan22_ti2v_5b", (1280, 704, 121, 24)),
    ],
)
def test_every_fastwan_id_runs_dmd_with_its_card(
    folders: dict[str, Path], tmp_path: Path, hf_id: str, fixture: str, defaults: tuple[int, ...]
) -> None:
    # A plain `WanPipeline` folder in the local cache under the id: the id alone selects DMD and the card.
    repo = tmp_path / "hub" / ("models--" + hf_id.replace("/", "--"))
    shutil.copytree(folders[fixture], repo / "snapshots" / "x")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("x")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
        gen = DiffGenerator.from_pretrained(hf_id, device="cpu")
    try:
        info = gen.info
        assert info["pipeline_class"] == "WanDMDPipeline" and info["hf_id"] == hf_id
        card = info["defaults"]
        assert (card["width"], card["height"], card["num_frames"], card["fps"]) == defaults
        assert (card["num_inference_steps"], card["guidance_scale"]) == (3, 1.0)
    finally:
        gen.shutdown()
