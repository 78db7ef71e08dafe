"""MP4 (H.264, yuv420p: plays in browsers) encoding and decoding through imageio-ffmpeg's bundled ffmpeg."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import imageio_ffmpeg
import numpy as np

from .encode import to_uint8

#: x264 constant-rate factor: visually lossless for generated video at a modest size.
DEFAULT_CRF = 17


def encode_mp4(frames: np.ndarray, fps: int, crf: int = DEFAULT_CRF) -> bytes:
    """Encodes float32 T×H×W×3 frames in [0, 1] (or uint8) as an MP4 file's bytes."""
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected T×H×W×3 frames, got shape {frames.shape}")
    pixels = frames if frames.dtype == np.uint8 else to_uint8(frames)
    _, height, width, _ = pixels.shape
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p H.264 needs even sizes, got {width}x{height}")
    fd, path = tempfile.mkstemp(suffix=".mp4")
    os.close(fd)
    try:
        writer = imageio_ffmpeg.write_frames(
            path,
            (width, height),
            fps=fps,
            codec="libx264",
            pix_fmt_out="yuv420p",
            quality=None,
            macro_block_size=1,
            # faststart puts the index first so browsers can play while downloading.
            output_params=["-crf", str(crf), "-movflags", "+faststart"],
            ffmpeg_log_level="error",
        )
        writer.send(None)
        for frame in pixels:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


def decode_mp4(data: bytes) -> tuple[np.ndarray, float]:
    """Decodes MP4 bytes to uint8 T×H×W×3 frames and the frame rate (for tests and clients)."""
    fd, path = tempfile.mkstemp(suffix=".mp4")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        width, height, fps = _probe(path)
        # Raw RGB frames on stdout; ffmpeg runs to completion, so no pipe outlives this call.
        decoded = subprocess.run(
            [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", path, "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
            capture_output=True,
            check=True,
        ).stdout
        frames = np.frombuffer(decoded, dtype=np.uint8).reshape(-1, height, width, 3)
        return frames, fps
    finally:
        os.unlink(path)


def _probe(path: str) -> tuple[int, int, float]:
    """Width, height and frame rate of the first video stream, from ffmpeg's stream description."""
    info = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", path], capture_output=True, text=True, check=False
    ).stderr
    stream = next((line for line in info.splitlines() if "Video:" in line), "")
    size = re.search(r"(\d{2,5})x(\d{2,5})", stream)
    rate = re.search(r"([\d.]+) fps", stream)
    if size is None or rate is None:
        raise ValueError(f"not a readable video: {stream or info.strip()[-200:]}")
    return int(size.group(1)), int(size.group(2)), float(rate.group(1))
