"""MP4 output: H.264 in yuv420p, decodable, with the frame count, size and rate asked for."""

from __future__ import annotations

import subprocess

import imageio_ffmpeg
import numpy as np
import pytest

from sgl_diffusion.runtime.video import decode_mp4, encode_mp4


def test_mp4_round_trip_keeps_frames_size_and_rate(tmp_path) -> None:
    # Smooth content (x264 is lossy on noise): a moving gradient.
    t, h, w = 9, 48, 64
    ramp = np.linspace(0, 1, w, dtype=np.float32)[None, None, :, None]
    frames = np.clip(ramp + np.arange(t, dtype=np.float32)[:, None, None, None] * 0.05, 0, 1).repeat(h, 1).repeat(3, 3)
    data = encode_mp4(frames, fps=16)
    decoded, fps = decode_mp4(data)
    assert decoded.shape == (t, h, w, 3)
    assert fps == pytest.approx(16)
    assert np.abs(decoded.astype(np.float32) / 255 - frames).mean() < 0.02
    path = tmp_path / "v.mp4"
    path.write_bytes(data)
    probe = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-i", str(path)], capture_output=True, text=True, check=False
    )
    assert "h264" in probe.stderr and "yuv420p" in probe.stderr


def test_odd_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="even"):
        encode_mp4(np.zeros((2, 31, 32, 3), dtype=np.float32), fps=8)
