"""The FLUX.2 fixtures (`sgl_diffusion.testing.flux2`) and the tokenizer loading FLUX.2 prompts depend on.

The parity tests trust these: builds are deterministic, the VAE's BatchNorm statistics (which the pipelines
de/normalise latents with) are not the identity, the text encoders reach the hard-coded hidden-state layers,
and the saved tokenizers give the ids (and chat templates) of the in-memory ones.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sgl_diffusion.models.flux2 import KLEIN_PROMPT, MISTRAL_PROMPT, load_chat_tokenizer
from sgl_diffusion.testing import FIXTURE_REGISTRY, build_fixture, build_pipeline

NAMES = ("flux2_dev", "flux2_klein", "flux2_klein_base")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("flux2_fixture")
    return {name: build_fixture(name, root / name) for name in NAMES}


def test_registered_with_their_pipelines(folders: dict[str, Path]) -> None:
    for name, pipeline_class in zip(NAMES, ("Flux2Pipeline", "Flux2KleinPipeline", "Flux2KleinPipeline"), strict=True):
        assert FIXTURE_REGISTRY[name].pipeline_class == pipeline_class
        index = json.loads((folders[name] / "model_index.json").read_text())
        assert index["_class_name"] == pipeline_class
    assert json.loads((folders["flux2_klein"] / "model_index.json").read_text())["is_distilled"] is True
    assert json.loads((folders["flux2_klein_base"] / "model_index.json").read_text())["is_distilled"] is False


def test_builds_are_deterministic(folders: dict[str, Path], tmp_path: Path) -> None:
    again = build_fixture("flux2_dev", tmp_path / "again")
    for file in sorted(p for p in folders["flux2_dev"].rglob("*") if p.is_file()):
        twin = again / file.relative_to(folders["flux2_dev"])
        assert twin.read_bytes() == file.read_bytes(), file.name


def test_vae_batch_norm_statistics_are_not_the_identity() -> None:
    vae = build_pipeline("flux2_klein").vae
    mean, var = vae.bn.running_mean, vae.bn.running_var
    assert mean.shape == var.shape == (128,)  # 32 latent channels x 2x2 patches
    assert mean.abs().min() > 0 and mean.std() > 0.05
    assert (var > 1).all() and var.std() > 0.1


@pytest.mark.parametrize(("name", "fmt"), [("flux2_dev", MISTRAL_PROMPT), ("flux2_klein", KLEIN_PROMPT)])
def test_saved_tokenizers_give_the_same_ids(folders: dict[str, Path], name: str, fmt) -> None:
    pipe = build_pipeline(name)
    saved = load_chat_tokenizer(folders[name] / "tokenizer")
    assert saved.chat_template == pipe.tokenizer.chat_template
    for prompt in ("a photo of a cat", "dance monkey", "hello world! it's a beautiful day"):
        text = pipe.tokenizer.apply_chat_template(fmt.messages(prompt), tokenize=False, add_generation_prompt=True)
        assert saved(text).input_ids == pipe.tokenizer(text).input_ids
    # The text encoder reaches the layers FLUX.2 reads (0 is the embedding output).
    assert pipe.text_encoder.config.get_text_config().num_hidden_layers == max(fmt.layers)


def test_a_prompt_fits_after_the_system_prompt(folders: dict[str, Path]) -> None:
    """Each word of FLUX.2-dev's system prompt is one token, so a short prompt survives 64-token truncation."""
    tokenizer = load_chat_tokenizer(folders["flux2_dev"] / "tokenizer")
    ids = tokenizer.apply_chat_template(
        [MISTRAL_PROMPT.messages("a photo of a cat")], tokenize=True, return_dict=True, add_generation_prompt=False
    )["input_ids"][0]
    assert len(ids) < 48
    assert tokenizer.convert_tokens_to_ids("[/INST]") == ids[-1]


def test_a_processor_kept_chat_template_is_found(folders: dict[str, Path], tmp_path: Path) -> None:
    """Published processor folders may keep the template in chat_template.json, beside the tokenizer files."""
    folder = shutil.copytree(folders["flux2_dev"] / "tokenizer", tmp_path / "tokenizer")
    template = load_chat_tokenizer(folder).chat_template
    (folder / "chat_template.jinja").unlink()
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    assert load_chat_tokenizer(folder).chat_template == template
    (folder / "chat_template.json").unlink()
    with pytest.raises(FileNotFoundError, match="chat template"):
        load_chat_tokenizer(folder)


def test_prompt_encoding_refuses_an_encoder_too_shallow(folders: dict[str, Path]) -> None:
    from sgl_diffusion.models.flux2 import encode_prompts

    pipe = build_pipeline("flux2_klein")
    with pytest.raises(ValueError, match="hidden states"):
        encode_prompts(pipe.text_encoder, pipe.tokenizer, ["a cat"], KLEIN_PROMPT.__class__(
            layers=(9, 18, 28), system_message=None, content_parts=False, render_then_tokenize=True
        ), max_sequence_length=16)  # fmt: skip
    embeds = encode_prompts(pipe.text_encoder, pipe.tokenizer, ["a cat", ""], KLEIN_PROMPT, max_sequence_length=16)
    assert embeds.shape == (2, 16, 48) and embeds.dtype == torch.float32
