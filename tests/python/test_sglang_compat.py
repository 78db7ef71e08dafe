"""Every command, config file and environment variable from SGLang Diffusion's docs parses: each flag, key and
variable is honoured or rejected with "<name> is not supported yet: <feature>", never an unknown argument and
never silently ignored. The docs' examples below are copied verbatim (only `sglang` became `sgl-diffusion`)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import torch

from server_util import running_server
from sgl_diffusion import DiffGenerator, _native, sglang_compat
from sgl_diffusion.cli import generate, main, serve
from sgl_diffusion.cli.options import CommandError
from sgl_diffusion.layers.attention import UNAVAILABLE_ATTENTION_BACKENDS, check_attention_backend_name
from sgl_diffusion.pipelines.registry import load_pipeline
from sgl_diffusion.runtime.options import RuntimeOptions

SGL_DIFFUSION = shutil.which("sgl-diffusion") or pytest.fail("the sgl-diffusion command is not installed")

# --- the docs' examples -----------------------------------------------------------------------------------------

#: "Generate": SERVER_ARGS=(...) and SAMPLING_ARGS=(...).
GENERATE_SERVER_ARGS = [
    "--model-path", "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
    "--text-encoder-cpu-offload",
    "--pin-cpu-memory",
    "--num-gpus", "4",
    "--ulysses-degree=2",
    "--ring-degree=2",
]  # fmt: skip
SAMPLING_ARGS = [
    "--prompt", "A curious raccoon",
    "--save-output",
    "--output-path", "outputs",
    "--output-file-name", "A curious raccoon.mp4",
]  # fmt: skip
#: "SGLang Diffusion OpenAI API / Serve": SERVER_ARGS=(...).
SERVE_SERVER_ARGS = [
    "--model-path", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    "--text-encoder-cpu-offload",
    "--pin-cpu-memory",
    "--num-gpus", "4",
    "--ulysses-degree=2",
    "--ring-degree=2",
    "--port", "30010",
]  # fmt: skip
#: What each SERVER_ARGS block asks for that is not built yet.
SERVER_ARGS_REJECTED = ["--text-encoder-cpu-offload", "--num-gpus", "--ulysses-degree", "--ring-degree"]

#: "Using Configuration Files": config.json and config.yaml.
CONFIG_JSON = """{
    "model_path": "FastVideo/FastHunyuan-diffusers",
    "prompt": "A beautiful woman in a red dress walking down a street",
    "output_path": "outputs/",
    "num_gpus": 2,
    "sp_size": 2,
    "tp_size": 1,
    "num_frames": 45,
    "height": 720,
    "width": 1280,
    "num_inference_steps": 6,
    "seed": 1024,
    "fps": 24,
    "precision": "bf16",
    "vae_precision": "fp16",
    "vae_tiling": true,
    "vae_sp": true,
    "vae_config": {
        "load_encoder": false,
        "load_decoder": true,
        "tile_sample_min_height": 256,
        "tile_sample_min_width": 256
    },
    "text_encoder_precisions": [
        "fp16",
        "fp16"
    ],
    "mask_strategy_file_path": null,
    "enable_torch_compile": false
}
"""
CONFIG_YAML = """model_path: "FastVideo/FastHunyuan-diffusers"
prompt: "A beautiful woman in a red dress walking down a street"
output_path: "outputs/"
num_gpus: 2
sp_size: 2
tp_size: 1
num_frames: 45
height: 720
width: 1280
num_inference_steps: 6
seed: 1024
fps: 24
precision: "bf16"
vae_precision: "fp16"
vae_tiling: true
vae_sp: true
vae_config:
  load_encoder: false
  load_decoder: true
  tile_sample_min_height: 256
  tile_sample_min_width: 256
text_encoder_precisions:
  - "fp16"
  - "fp16"
mask_strategy_file_path: null
enable_torch_compile: false
"""
#: The example config's keys that ask for something not built yet, and what each error says.
CONFIG_REJECTED = {
    "num_gpus": "multi-GPU inference",
    "sp_size": "sequence parallelism",
    "vae_sp": "sequence-parallel VAE decoding",
    "vae_config": "skipping the VAE encoder at load time",
}
#: The same file's keys that are honoured, with the option each one sets.
CONFIG_HONOURED = {
    "model_path": ("model_path", "FastVideo/FastHunyuan-diffusers"),
    "prompt": ("prompt", "A beautiful woman in a red dress walking down a street"),
    "output_path": ("output_path", "outputs/"),
    "tp_size": ("tp_size", 1),
    "num_frames": ("num_frames", 45),
    "height": ("height", 720),
    "width": ("width", 1280),
    "num_inference_steps": ("num_inference_steps", 6),
    "seed": ("seed", 1024),
    "fps": ("fps", 24),
    "precision": ("dit_precision", "bf16"),
    "vae_precision": ("vae_precision", "fp16"),
    "vae_tiling": ("vae_tiling", True),
    "text_encoder_precisions": ("text_encoder_precisions", ["fp16", "fp16"]),
    "mask_strategy_file_path": ("mask_strategy_file_path", None),
    "enable_torch_compile": ("enable_torch_compile", False),
}

#: "Diffusers Backend": the Ovis-Image-7B command and the diffusers_kwargs config.
OVIS_COMMAND = [
    "--model-path", "AIDC-AI/Ovis-Image-7B",
    "--backend", "diffusers",
    "--trust-remote-code",
    "--diffusers-attention-backend", "flash",
    "--prompt", "A serene Japanese garden with cherry blossoms",
    "--height", "1024",
    "--width", "1024",
    "--num-inference-steps", "30",
    "--save-output",
    "--output-path", "outputs",
    "--output-file-name", "ovis_garden.png",
]  # fmt: skip
DIFFUSERS_KWARGS_CONFIG = """{
    "model_path": "AIDC-AI/Ovis-Image-7B",
    "backend": "diffusers",
    "prompt": "A beautiful landscape",
    "diffusers_kwargs": {
        "cross_attention_kwargs": {"scale": 0.5}
    }
}
"""

#: "Cache-DiT Acceleration": each example's environment.
CACHE_DIT_EXAMPLES = {
    "basic": {"SGLANG_CACHE_DIT_ENABLED": "true"},
    "combined": {
        "SGLANG_CACHE_DIT_ENABLED": "true",
        "SGLANG_CACHE_DIT_FN": "2",
        "SGLANG_CACHE_DIT_BN": "1",
        "SGLANG_CACHE_DIT_WARMUP": "4",
        "SGLANG_CACHE_DIT_RDT": "0.4",
        "SGLANG_CACHE_DIT_MC": "4",
        "SGLANG_CACHE_DIT_TAYLORSEER": "true",
        "SGLANG_CACHE_DIT_TS_ORDER": "2",
    },
    "scm_preset": {"SGLANG_CACHE_DIT_ENABLED": "true", "SGLANG_CACHE_DIT_SCM_PRESET": "medium"},
    "scm_bins": {
        "SGLANG_CACHE_DIT_ENABLED": "true",
        "SGLANG_CACHE_DIT_SCM_COMPUTE_BINS": "8,3,3,2,2",
        "SGLANG_CACHE_DIT_SCM_CACHE_BINS": "1,2,2,2,3",
    },
    "scm_policy": {"SGLANG_CACHE_DIT_ENABLED": "true", "SGLANG_CACHE_DIT_SCM_POLICY": "static"},
}
#: Every variable of the docs' "Environment Variables" table.
CACHE_DIT_VARIABLES = [
    "SGLANG_CACHE_DIT_ENABLED", "SGLANG_CACHE_DIT_FN", "SGLANG_CACHE_DIT_BN", "SGLANG_CACHE_DIT_WARMUP",
    "SGLANG_CACHE_DIT_RDT", "SGLANG_CACHE_DIT_MC", "SGLANG_CACHE_DIT_TAYLORSEER", "SGLANG_CACHE_DIT_TS_ORDER",
    "SGLANG_CACHE_DIT_SCM_PRESET", "SGLANG_CACHE_DIT_SCM_POLICY", "SGLANG_CACHE_DIT_SCM_COMPUTE_BINS",
    "SGLANG_CACHE_DIT_SCM_CACHE_BINS",
]  # fmt: skip
#: "Using Sliding Tile Attention (STA)".
STA_ENV = {"SGLANG_DIFFUSION_ATTENTION_CONFIG": "/abs/path/to/mask_strategy.json"}
STA_COMMAND = ["--model-path", "<MODEL_PATH_OR_ID>", "--prompt", "...", "--attention-backend", "sliding_tile_attn"]

#: Every flag the docs name, with the commands it is given to there.
DOCS_FLAGS = {
    "generate": [
        "--model-path", "--vae-path", "--lora-path", "--lora-nickname", "--num-gpus", "--tp-size", "--sp-degree",
        "--ulysses-degree", "--ring-degree", "--prompt", "--num-inference-steps", "--negative-prompt", "--seed",
        "--height", "--width", "--num-frames", "--fps", "--output-path", "--save-output", "--return-frames",
        "--config", "--text-encoder-cpu-offload", "--pin-cpu-memory", "--output-file-name", "--backend",
        "--diffusers-attention-backend", "--trust-remote-code", "--vae-tiling", "--vae-slicing", "--dit-precision",
        "--vae-precision", "--attention-backend", "--profile", "--num-profiled-timesteps", "--profile-all-stages",
        "--perf-dump-path", "--port",
    ],
    "serve": [
        "--model-path", "--vae-path", "--lora-path", "--lora-nickname", "--num-gpus", "--tp-size", "--sp-degree",
        "--ulysses-degree", "--ring-degree", "--text-encoder-cpu-offload", "--pin-cpu-memory", "--port", "--config",
        "--backend", "--diffusers-attention-backend", "--trust-remote-code", "--vae-tiling", "--vae-slicing",
        "--dit-precision", "--vae-precision", "--attention-backend", "--profile", "--num-profiled-timesteps",
        "--profile-all-stages",
    ],
}  # fmt: skip

SMALL_FLAGS = ["--num-inference-steps", "2", "--max-sequence-length", "16", "--height", "32", "--width", "32"]

# --- helpers ----------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def no_sglang_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests set the SGLang variables they mean; none leaks in from the caller's shell."""
    for name in list(os.environ):
        if name.startswith(("SGLANG_CACHE_DIT_", "SGLANG_DIFFUSION_ATTENTION_CONFIG")):
            monkeypatch.delenv(name)


def command_parser(command: str) -> argparse.ArgumentParser:
    commands = argparse.ArgumentParser(prog="sgl-diffusion").add_subparsers()
    return generate.add_parser(commands) if command == "generate" else serve.add_parser(commands)


def parse(command: str, argv: list[str]) -> dict[str, Any]:
    """The command's checked options (in-process, nothing loads); raises `CommandError` like the CLI reports it."""
    if command == "serve":
        try:
            return json.loads(serve.parse_serve_config(argv))
        except SystemExit as exit_:
            raise CommandError(f"exit {exit_.code}") from exit_
    parser = command_parser(command)
    return generate.checked_options(parser, parser.parse_args(argv))


def usage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Runs `sgl-diffusion ARGV` in-process; it must stop with a usage error (exit 2) before loading anything."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" not in err, err
    return err.split(": error: ", 1)[1]  # the message, without the usage line (which lists every flag)


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [SGL_DIFFUSION, *args],
        check=False,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


# --- flags ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_every_flag_in_the_docs_is_known(command: str) -> None:
    known = command_parser(command)._option_string_actions
    assert [flag for flag in DOCS_FLAGS[command] if flag not in known] == []


@pytest.mark.parametrize(
    ("command", "argv"),
    [("generate", GENERATE_SERVER_ARGS + SAMPLING_ARGS), ("serve", SERVE_SERVER_ARGS)],
    ids=["generate", "serve"],
)
def test_the_docs_server_args_name_each_missing_feature(
    capsys: pytest.CaptureFixture[str], command: str, argv: list[str]
) -> None:
    err = usage_error(capsys, [command, *argv])
    for flag in SERVER_ARGS_REJECTED:
        assert f"{flag} is not supported yet" in err, err
    assert "CPU offload of the text encoders" in err and "multi-GPU inference" in err
    for honoured in ("--pin-cpu-memory", "--model-path", "--port", "--prompt", "--output-file-name"):
        assert honoured not in err, err


def test_the_docs_server_args_with_one_gpu_are_honoured() -> None:
    """The same blocks asking for nothing we lack: one GPU, degrees of 1, no offload."""
    one_gpu = ["--num-gpus", "1", "--ulysses-degree=1", "--ring-degree=1", "--text-encoder-cpu-offload", "false"]
    options = parse("generate", [*GENERATE_SERVER_ARGS, *SAMPLING_ARGS, *one_gpu])
    assert options["model_path"] == "Wan-AI/Wan2.2-T2V-A14B-Diffusers"
    assert (options["prompt"], options["save_output"], options["output_path"]) == ("A curious raccoon", True, "outputs")
    assert options["output_file_name"] == "A curious raccoon.mp4"
    assert (options["pin_cpu_memory"], options["text_encoder_cpu_offload"]) == (True, False)
    config = parse("serve", [*SERVE_SERVER_ARGS, *one_gpu])
    assert (config["server"]["port"], config["engine"]["model"]["model_path"]) == (30010, SERVE_SERVER_ARGS[1])
    # SGLang's options never reach the engine: nothing there could act on them.
    assert set(config["engine"]["model"]) == {"model_path"}


HONOURED_FLAGS: list[tuple[list[str], str, Any]] = [
    (["--pin-cpu-memory"], "pin_cpu_memory", True),
    (["--pin-cpu-memory", "false"], "pin_cpu_memory", False),
    (["--num-gpus", "1"], "num_gpus", 1),
    (["--tp-size", "1"], "tp_size", 1),
    (["--sp-degree", "1"], "sp_degree", 1),
    (["--ulysses-degree=1"], "ulysses_degree", 1),
    (["--ring-degree=1"], "ring_degree", 1),
    (["--text-encoder-cpu-offload", "false"], "text_encoder_cpu_offload", False),
    (["--backend", "auto"], "backend", "auto"),
    (["--backend", "sglang"], "backend", "sglang"),
    (["--backend", "diffusers"], "backend", "diffusers"),
    (["--diffusers-attention-backend", "flash"], "diffusers_attention_backend", "flash"),
    (["--vae-path", "fal/FLUX.2-Tiny-AutoEncoder"], "vae_path", "fal/FLUX.2-Tiny-AutoEncoder"),
    (["--trust-remote-code"], "trust_remote_code", True),
    (["--attention-backend", "fa3"], "attention_backend", "fa"),
    (["--attention-backend", "fa4"], "attention_backend", "fa4"),
    (["--attention-backend", "video_sparse_attn"], "attention_backend", "video_sparse_attn"),
    (["--attention-backend", "torch_sdpa"], "attention_backend", "torch_sdpa"),
    (["--precision", "bf16"], "dit_precision", "bf16"),
    (["--text-encoder-precisions", "fp16", "fp32"], "text_encoder_precisions", ["fp16", "fp32"]),
    (["--lora-path", "lightx2v/Wan2.1-Distill-Loras"], "lora_path", "lightx2v/Wan2.1-Distill-Loras"),
    (["--lora-nickname", "distill"], "lora_nickname", "distill"),
    (["--lora-scale", "0.8"], "lora_scale", 0.8),
    (["--vae-tiling"], "vae_tiling", True),
    (["--vae-slicing"], "vae_slicing", True),
    (["--profile", "--num-profiled-timesteps", "5", "--profile-all-stages"], "num_profiled_timesteps", 5),
    (["--perf-dump-path", "perf.json"], "perf_dump_path", "perf.json"),
    (["--save-output"], "save_output", True),
    (["--output-file-name", "ovis_garden.png"], "output_file_name", "ovis_garden.png"),
]


@pytest.mark.parametrize(("flags", "name", "value"), HONOURED_FLAGS, ids=lambda x: " ".join(x) if isinstance(x, list) else None)  # fmt: skip
def test_honoured_flags(flags: list[str], name: str, value: Any) -> None:
    assert parse("generate", ["--prompt", "a", *flags])[name] == value


REJECTED_FLAGS: list[tuple[list[str], str, str]] = [
    (["--num-gpus", "4"], "--num-gpus", "multi-GPU inference"),
    (["--tp-size", "2"], "--tp-size", "tensor parallelism"),
    (["--sp-degree", "2"], "--sp-degree", "sequence parallelism"),
    (["--ulysses-degree=2"], "--ulysses-degree", "Ulysses sequence parallelism"),
    (["--ring-degree=2"], "--ring-degree", "ring-attention sequence parallelism"),
    (["--text-encoder-cpu-offload"], "--text-encoder-cpu-offload", "CPU offload of the text encoders"),
    (["--dit-cpu-offload", "true"], "--dit-cpu-offload", "CPU offload of the DiT"),
    (["--return-frames"], "--return-frames", "returning raw frames"),
    (["--vae-sp"], "--vae-sp", "sequence-parallel VAE decoding"),
    (["--cache-dit"], "--cache-dit", "Cache-DiT step caching"),
    (["--enable-teacache"], "--enable-teacache", "TeaCache step caching"),
]


@pytest.mark.parametrize("command", ["generate", "serve"])
@pytest.mark.parametrize(("flags", "flag", "what"), REJECTED_FLAGS, ids=[f[1] for f in REJECTED_FLAGS])
def test_rejected_flags_name_the_flag_and_the_feature(
    capsys: pytest.CaptureFixture[str], command: str, flags: list[str], flag: str, what: str
) -> None:
    err = usage_error(capsys, [command, "--prompt", "a", *flags] if command == "generate" else [command, *flags])
    assert f"{flag} is not supported yet: {what}" in err, err
    assert "allowed:" in err


@pytest.mark.parametrize("name", sorted(UNAVAILABLE_ATTENTION_BACKENDS))
def test_attention_backends_without_a_package_here(capsys: pytest.CaptureFixture[str], name: str) -> None:
    what, _ = UNAVAILABLE_ATTENTION_BACKENDS[name]
    with pytest.raises(
        ValueError, match=rf"'{name}' \({what}\) is not available on this platform: .*; available: torch_sdpa"
    ):
        check_attention_backend_name(name)
    err = usage_error(capsys, ["generate", "--prompt", "a", "--attention-backend", name])
    assert f"--attention-backend: attention backend '{name}' ({what}) is not available on this platform" in err, err


def test_attention_alias_fa3_reaches_the_engine_as_fa() -> None:
    """`fa3` means `fa` on every path: `fa` needs CUDA and flash-attn, which the error names (not 'fa3'). SGLang
    also reads `fa4` as `fa`; here it is FlashAttention-4 (its own package)."""
    with pytest.raises(ValueError, match="attention backend 'fa'"):
        RuntimeOptions.from_config({"device": "cpu", "attention_backend": "fa3"})
    with pytest.raises(ValueError, match="attention backend 'fa4' needs the flash-attn-4 package"):
        RuntimeOptions.from_config({"device": "cpu", "attention_backend": "fa4"})


def test_serve_options_given_to_generate_are_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error(capsys, ["generate", "--prompt", "a", "--port", "30010", "--host", "0.0.0.0"])
    assert "--port applies to `sgl-diffusion serve` only" in err and "--host applies to" in err


# --- config files ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "text"), [("config.json", CONFIG_JSON), ("config.yaml", CONFIG_YAML)])
def test_the_docs_config_file(capsys: pytest.CaptureFixture[str], tmp_path: Path, name: str, text: str) -> None:
    config = tmp_path / name
    config.write_text(text)
    err = usage_error(capsys, ["generate", "--config", str(config)])
    for key, what in CONFIG_REJECTED.items():
        assert f"{config}: {key} is not supported yet: {what}" in err, err
    assert "choosing the VAE tile size (vae_config.tile_sample_min_height" in err
    for key in CONFIG_HONOURED:
        assert f": {key} " not in err, err
    # With the values that ask for more than one GPU (and the VAE options) turned off, every key is honoured.
    honoured = text
    for old, new in [("2", "1"), ("true", "false")]:
        for key in ("num_gpus", "sp_size", "vae_sp"):
            honoured = honoured.replace(f'"{key}": {old}', f'"{key}": {new}').replace(f"{key}: {old}", f"{key}: {new}")
    honoured = honoured.replace("load_encoder: false", "load_encoder: true")
    honoured = honoured.replace('"load_encoder": false', '"load_encoder": true')
    honoured = honoured.replace("tile_sample_min_height: 256", "tile_sample_min_height: null")
    honoured = honoured.replace("tile_sample_min_width: 256", "tile_sample_min_width: null")
    honoured = honoured.replace('"tile_sample_min_height": 256', '"tile_sample_min_height": null')
    honoured = honoured.replace('"tile_sample_min_width": 256', '"tile_sample_min_width": null')
    config.write_text(honoured)
    options = parse("generate", ["--config", str(config)])
    for key, (option, value) in CONFIG_HONOURED.items():
        assert options[option] == value, key
    assert (options["num_gpus"], options["sp_degree"], options["vae_sp"]) == (1, 1, False)


def test_config_aliases_cannot_disagree(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("prompt: a\nprecision: bf16\ndit_precision: fp32\n")
    with pytest.raises(CommandError, match="dit_precision and precision are the same option"):
        parse("generate", ["--config", str(config)])


def test_the_docs_diffusers_backend_examples(tmp_path: Path) -> None:
    # The diffusers backend's options are ours (declared on `ModelConfig`): they reach the engine as given.
    model = parse("serve", OVIS_COMMAND[:7])["engine"]["model"]  # its model flags
    assert (model["backend"], model["trust_remote_code"], model["diffusers_attention_backend"]) == (
        "diffusers", True, "flash",
    )  # fmt: skip
    options = parse("generate", OVIS_COMMAND)
    assert (options["backend"], options["trust_remote_code"], options["diffusers_attention_backend"]) == (
        "diffusers", True, "flash",
    )  # fmt: skip
    config = tmp_path / "config.json"
    config.write_text(DIFFUSERS_KWARGS_CONFIG)
    options = parse("generate", ["--config", str(config)])
    assert (options["backend"], options["diffusers_kwargs"]) == (
        "diffusers",
        {"cross_attention_kwargs": {"scale": 0.5}},
    )


# --- environment variables --------------------------------------------------------------------------------------


@pytest.mark.parametrize("example", sorted(CACHE_DIT_EXAMPLES))
def test_the_docs_cache_dit_examples_fail_loudly(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, example: str
) -> None:
    for name, value in CACHE_DIT_EXAMPLES[example].items():
        monkeypatch.setenv(name, value)
    for argv in (["generate", "--prompt", "A curious raccoon in a forest"], ["serve"]):
        err = usage_error(capsys, argv)
        assert "SGLANG_CACHE_DIT_ENABLED=true is not supported yet: Cache-DiT step caching" in err, err
        for name, value in CACHE_DIT_EXAMPLES[example].items():
            assert f"{name}={value} is not supported yet" in err, err


@pytest.mark.parametrize("name", CACHE_DIT_VARIABLES[1:])
def test_each_cache_dit_tuning_variable_fails_alone(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Tuning variables ask for caching too (even next to SGLANG_CACHE_DIT_ENABLED=false): never silently unused."""
    monkeypatch.setenv("SGLANG_CACHE_DIT_ENABLED", "false")
    monkeypatch.setenv(name, "1")
    with pytest.raises(sglang_compat.NotSupportedYetError, match=rf"^{name}=1 is not supported yet: Cache-DiT"):
        sglang_compat.check_environment()


@pytest.mark.parametrize("value", ["false", "0", "False", ""])
def test_cache_dit_disabled_is_fine(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("SGLANG_CACHE_DIT_ENABLED", value)
    sglang_compat.check_environment()
    assert parse("generate", ["--prompt", "a"])["prompt"] == "a"


def test_the_docs_sliding_tile_attention_example(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The docs' STA example parses; the engine reads the mask strategy the variable names (here a file that is
    not there, which the error says), or `--mask-strategy-file-path` / the config key names."""
    for name, value in STA_ENV.items():
        monkeypatch.setenv(name, value)
    options = parse("generate", STA_COMMAND)
    assert options["attention_backend"] == "sliding_tile_attn"
    with pytest.raises(ValueError, match="mask strategy file /abs/path/to/mask_strategy.json: cannot read it"):
        RuntimeOptions.from_config({"device": "cpu", "attention_backend": options["attention_backend"]})
    strategy = tmp_path / "mask_strategy.json"
    strategy.write_text(json.dumps({"0_0_0": [3, 3, 3]}))
    monkeypatch.delenv("SGLANG_DIFFUSION_ATTENTION_CONFIG")
    options = parse("generate", [*STA_COMMAND, "--mask-strategy-file-path", str(strategy)])
    assert options["mask_strategy_file_path"] == str(strategy)
    runtime = RuntimeOptions.from_config(
        {"device": "cpu", "attention_backend": "sliding_tile_attn", "mask_strategy_file_path": str(strategy)}
    )
    assert runtime.video_sparse.strategy is not None and runtime.video_sparse.strategy.steps == 1


def test_every_entry_point_checks_the_environment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, flux_dir: Path
) -> None:
    """The CLI's early check is a convenience: RuntimeOptions (built by every engine) refuses on its own."""
    monkeypatch.setenv("SGLANG_CACHE_DIT_ENABLED", "true")
    with pytest.raises(sglang_compat.NotSupportedYetError, match="SGLANG_CACHE_DIT_ENABLED=true"):
        RuntimeOptions.for_device("cpu")
    with pytest.raises(_native.ModelLoadError, match="not supported yet: Cache-DiT step caching"):
        DiffGenerator.from_pretrained(flux_dir, device="cpu")
    with pytest.raises(SystemExit) as exit_:
        serve.parse_serve_config(["--model-path", str(flux_dir)])
    assert exit_.value.code == 2 and "Cache-DiT step caching" in capsys.readouterr().err
    # The native binary parses its flags with clap and hands them to config_from_flags.
    with pytest.raises(CommandError, match="Cache-DiT step caching"):
        serve.config_from_flags(json.dumps({"model_path": str(flux_dir)}))


# --- text encoder precisions (SGLang's text_encoder_precisions, implemented) ------------------------------------


def test_text_encoder_precisions_set_each_encoder(flux_dir: Path) -> None:
    options = RuntimeOptions.for_device("cpu", text_encoder_precisions=["fp32", "bf16"])
    pipeline = load_pipeline(flux_dir, "FluxPipeline", None, options)
    assert (pipeline.c.clip.dtype, pipeline.c.t5.dtype) == (torch.float32, torch.bfloat16)
    assert pipeline.c.transformer.x_embedder.weight.dtype == torch.float32
    with pytest.raises(ValueError, match=r"text_encoder_precisions: this model has 2 text encoder\(s\)"):
        load_pipeline(
            flux_dir, "FluxPipeline", None, RuntimeOptions.for_device("cpu", text_encoder_precisions=["fp16"])
        )


# --- real processes ---------------------------------------------------------------------------------------------


def test_the_real_command_generates_with_honoured_sglang_options(flux_dir: Path, tmp_path: Path) -> None:
    """SGLang's spellings end to end: its flags with values we honour, and its config keys (`precision`,
    `text_encoder_precisions`, `tp_size`, `vae_config`, ...) from a YAML file."""
    config = tmp_path / "config.yaml"
    config.write_text(
        f'model_path: "{flux_dir}"\nprompt: "A curious raccoon"\noutput_path: "{tmp_path / "outputs"}"\n'
        "num_gpus: 1\nsp_size: 1\ntp_size: 1\nseed: 1024\nprecision: fp32\nvae_precision: fp32\nvae_sp: false\n"
        "vae_config:\n  load_encoder: true\n  load_decoder: true\ntext_encoder_precisions: [fp32, bf16]\n"
        "mask_strategy_file_path: null\nenable_torch_compile: false\n"
    )
    proc = run_cli(
        "generate", "--config", str(config), "--device", "cpu", *SMALL_FLAGS,
        "--text-encoder-cpu-offload", "false", "--pin-cpu-memory", "--num-gpus", "1", "--ulysses-degree=1",
        "--ring-degree=1", "--backend", "sglang", "--save-output", "--output-file-name", "A curious raccoon.png",
        cwd=tmp_path, env={"SGLANG_CACHE_DIT_ENABLED": "false"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert [Path(line) for line in proc.stdout.split("\n") if line] == [tmp_path / "outputs" / "A curious raccoon.png"]
    assert (tmp_path / "outputs" / "A curious raccoon.png").stat().st_size > 0


def test_the_real_command_refuses_cache_dit(flux_dir: Path, tmp_path: Path) -> None:
    proc = run_cli(
        "generate", "--model-path", str(flux_dir), "--prompt", "A curious raccoon", "--device", "cpu", *SMALL_FLAGS,
        cwd=tmp_path, env={"SGLANG_CACHE_DIT_ENABLED": "true"},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "SGLANG_CACHE_DIT_ENABLED=true is not supported yet: Cache-DiT step caching" in proc.stderr
    assert proc.stdout == "" and not list(tmp_path.glob("**/*.png"))


@pytest.fixture(scope="module")
def server(flux_dir: Path) -> Iterator[Any]:
    # SGLang's flags with values that ask for nothing new are accepted by a real server too.
    with running_server(flux_dir, "--num-gpus", "1", "--pin-cpu-memory", "--backend", "auto") as running:
        yield running


def test_models_routes_use_the_docs_spelling(server: Any, flux_dir: Path) -> None:
    info = httpx.get(f"{server.base_url}/models", timeout=10).json()
    assert (info["task_type"], info["pipeline_name"], info["pipeline_class"]) == (
        "T2I",
        "flux_pipeline",
        "FluxPipeline",
    )
    assert (info["task"], info["family"], info["num_gpus"]) == ("text-to-image", "flux1", 1)
    assert info["model_path"] == str(flux_dir)
    (card,) = httpx.get(f"{server.base_url}/v1/models", timeout=10).json()["data"]
    assert (card["task_type"], card["pipeline_name"], card["pipeline_class"]) == (
        "T2I",
        "flux_pipeline",
        "FluxPipeline",
    )
    assert (card["task"], card["family"]) == ("text-to-image", "flux1")
