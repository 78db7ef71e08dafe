"""MP4 (H.264, yuv420p: plays in browsers) encoding and decoding through imageio-ffmpeg's bundled ffmpeg."""

from __future__ import annotations

import os
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
        reader = imageio_ffmpeg.read_frames(path, pix_fmt="rgb24")
        try:
            meta = next(reader)
            width, height = meta["size"]
            frames = [np.frombuffer(frame, dtype=np.uint8).reshape(height, width, 3) for frame in reader]
        finally:
            reader.close()  # ends the ffmpeg subprocess and closes its pipes
        return np.stack(frames), float(meta["fps"])
    finally:
        os.unlink(path)
