"""The one Python surface the Rust engine calls.

`PipelineExecutor` is created and used only on the engine's worker thread. It receives plain data
(JSON) and returns encoded bytes plus JSON metadata: tensors never reach Rust.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .. import _native
from ..errors import invalid_request
from ..lora.per_request import RequestLoras, request_adapters
from ..lora.served import ServedLoras
from ..pipelines import load_pipeline
from ..pipelines.family import FamilyPipeline
from .compile import compile_repeated_blocks
from .cuda_graphs import enable_cuda_graphs
from .device import precision_name
from .encode import encode_image
from .options import RuntimeOptions
from .request import Request
from .video import encode_mp4
from .warmup import warm_up


class PipelineExecutor:
    def __init__(self, config_json: str) -> None:
        config = json.loads(config_json)
        self.options = RuntimeOptions.from_config({k: v for k, v in config["options"].items() if v is not None})
        self.model_path = config["model_path"]
        self.hf_id = config.get("hf_id")
        self.pipeline = load_pipeline(Path(self.model_path), config["pipeline_class"], self.hf_id, self.options)
        if self.options.enable_torch_compile:
            for denoiser in self.pipeline.denoisers():
                compile_repeated_blocks(denoiser)
        for denoiser in self.pipeline.denoisers():
            enable_cuda_graphs(denoiser, self.options.cuda_graphs, self.options.device)
        self._loras: ServedLoras | None = None

    def _served_loras(self, field: str) -> ServedLoras:
        if self._loras is None:
            if not isinstance(self.pipeline, FamilyPipeline):
                raise invalid_request(
                    field, "LoRA adapters apply to native pipelines; the diffusers backend takes none yet"
                )
            loader = self.pipeline.lora_loader_class or self.pipeline.pipeline_class
            self._loras = ServedLoras(self.pipeline.denoisers(), loader)
        return self._loras

    def lora_command(self, command_json: str) -> str:
        """Runs a LoRA command (`sgl_core::lora::LoraCommand`, its paths checked by the Rust registry) between
        batches; returns the LoRA state after it (`sgl_core::lora::LoraState`) as JSON."""
        if self._loras is None and json.loads(command_json)["op"] == "list":
            return json.dumps({"loaded_adapters": [], "active": {}})
        return self._served_loras("lora_path").command(command_json)

    def _request_loras(self, requests: list[Request], files: dict[str, str]) -> list[RequestLoras]:
        """The batch feature of the requests' own LoRA adapters (`lora`), if any request names one."""
        if not any(request.lora for request in requests):
            return []
        served = self._served_loras("lora")
        adapters = served.for_requests(files)
        return [RequestLoras(self.pipeline.denoisers(), request_adapters(requests, adapters), self.options.device)]

    def wants_warmup(self) -> bool:
        """Whether to run `warm_up` before the first request (`--warmup`; default: with torch.compile)."""
        return self.options.warmup

    def warm_up(self, request_json: str) -> float:
        """Runs the warm-up request the core resolved (`sgl_bridge::warmup`); returns the seconds it took."""
        return warm_up(self.pipeline, Request.from_wire({"id": 0, "request": json.loads(request_json)}))

    def info_json(self) -> str:
        """`sgl_core::PipelineInfo` as JSON."""
        info: dict[str, Any] = {
            "model_path": self.model_path,
            "hf_id": self.hf_id,
            "device": str(self.options.device),
            "dit_precision": precision_name(self.options.dit_dtype),
            "vae_precision": precision_name(self.options.vae_dtype),
            "attention_backend": self.options.attention_backend,
            **self.pipeline.spec.info_fields(),
        }
        return json.dumps(info)

    def run_batch(self, batch_json: str, progress: Any) -> list[tuple[list[bytes], str] | None]:
        """Runs one batch (`sgl_bridge`'s `WireBatch`: the requests, the files of the LoRA adapters they name,
        the adapters to let go of first); returns per request `(encoded outputs, metadata JSON)`, or `None` for a
        request cancelled while the batch ran."""
        batch = json.loads(batch_json)
        requests = [Request.from_wire(item) for item in batch["items"]]
        if batch["lora_drop"] and self._loras is not None:
            self._loras.drop(batch["lora_drop"])
        features = self._request_loras(requests, batch["lora_files"])
        try:
            state = self.pipeline.run(requests, progress, features=features)
        except torch.OutOfMemoryError:
            # Give the cached blocks back so the next (maybe smaller) batch can run.
            torch.cuda.empty_cache()
            raise
        except RuntimeError as err:
            if is_unrecoverable_device_error(err):
                # The engine keeps it for /health (503) and refuses new work: only a restart helps.
                raise _native.DeviceFailedError(f"{type(err).__name__}: {err}") from err
            raise
        perf = state.perf.as_dict()
        owners = state.row_owner.tolist()
        results: list[tuple[list[bytes], str] | None] = []
        for index, request in enumerate(requests):
            if index not in state.active:
                results.append(None)
                continue
            rows = [row for row, owner in enumerate(owners) if owner == index]
            outputs = [self._encode(state, row, request) for row in rows]
            metadata = {"seed": request.seed, "batch_size": len(requests), "perf": perf, "notes": list(request.notes)}
            results.append((outputs, json.dumps(metadata)))
        return results

    def _encode(self, state: Any, row: int, request: Request) -> bytes:
        if self.pipeline.spec.output == "video":
            frames = state["videos"][row]
            if request.output_format == "npy":
                return encode_image(frames, "npy")
            return encode_mp4(frames, fps=request.fps or 16)
        return encode_image(state["images"][row], request.output_format, request.output_quality)


#: CUDA errors that leave the CUDA context unusable ("sticky" errors): every later kernel launch in the
#: process fails the same way, so the server must be restarted. Recoverable launch errors (a bad launch
#: configuration, out of memory) are not listed.
STICKY_DEVICE_ERRORS = (
    "an illegal memory access was encountered",
    "misaligned address",
    "device-side assert triggered",
    "unspecified launch failure",
    "an illegal instruction was encountered",
    "uncorrectable ECC error",
    "hardware stack error",
    "CUDA-capable device(s) is/are busy or unavailable",
)


def is_unrecoverable_device_error(err: BaseException) -> bool:
    """Whether `err` is a CUDA error after which no later request can run in this process."""
    if isinstance(err, torch.OutOfMemoryError):
        return False
    text = str(err)
    return any(marker in text for marker in STICKY_DEVICE_ERRORS)
