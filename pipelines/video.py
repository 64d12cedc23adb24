"""Episode videos: animated GIF (Pillow) or MP4 (OpenCV's bundled encoder), written atomically.

Why two writers: a GIF opens anywhere (GitHub, notebooks, slides) and needs only Pillow, but it must hold
every frame until it is written, so it is capped (`max_frames`); an MP4 streams frames to disk and suits
whole 27k-step episodes. imageio/ffmpeg are not dependencies: MP4 goes through `cv2.VideoWriter` ("mp4v"),
which the opencv-python wheels ship; where it cannot open, `VideoRecorder` says so instead of writing nothing.

Frames are the raw RGB screens (`AtariEnv.render_rgb()`, 210×160), one per agent step. One agent step is 4
emulator frames at 60 Hz, so real time is 15 steps/s (the default `fps`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from jowa_common.errors import ConfigError
from jowa_common.io import atomic_path

FORMATS = ("gif", "mp4")
REAL_TIME_FPS = 15.0  # agent steps per second of game time: 60 Hz / frame skip 4


class VideoRecorder:
    """`add(rgb)` frames, then `close()` writes `path` (GIF or MP4, from `fmt`) in one atomic step.

    `max_frames` caps the frames kept (later ones are counted in `dropped`); `scale` enlarges each frame by
    an integer factor (nearest neighbour) so small Atari screens stay crisp.
    """

    def __init__(self, path: str | Path, fmt: str = "gif", fps: float = REAL_TIME_FPS, max_frames: int = 5000,
                 scale: int = 1):
        if fmt not in FORMATS:
            raise ConfigError(f"{path}: video format must be one of {FORMATS}, got {fmt!r}")
        if fps <= 0 or max_frames < 1 or scale < 1:
            raise ConfigError(f"{path}: need fps > 0, max_frames >= 1 and scale >= 1, got {fps}, {max_frames}, {scale}")
        self.path, self.fmt, self.fps, self.max_frames, self.scale = Path(path), fmt, float(fps), max_frames, scale
        self.frames = 0  # frames written (or held, for a GIF)
        self.dropped = 0  # frames past max_frames
        self._gif: list = []  # palette images (1 byte/pixel) until close()
        self._writer = None  # cv2.VideoWriter into self._tmp
        self._tmp: Path | None = None
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _open_mp4(self, h: int, w: int) -> None:
        import cv2

        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".mp4", dir=self.path.parent)
        os.close(fd)
        self._tmp = Path(tmp)
        self._writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h))
        if not self._writer.isOpened():
            self._tmp.unlink(missing_ok=True)
            raise ConfigError(f"{self.path}: this OpenCV build has no MP4 encoder ('mp4v'); record a GIF instead")

    def add(self, rgb: np.ndarray) -> None:
        """One (H, W, 3) uint8 RGB frame."""
        if self.frames >= self.max_frames:
            self.dropped += 1
            return
        rgb = np.asarray(rgb, dtype=np.uint8)
        if self.scale > 1:
            rgb = rgb.repeat(self.scale, 0).repeat(self.scale, 1)
        if self.fmt == "gif":
            from PIL import Image

            # Atari screens have few colours: an adaptive palette is exact and keeps 1 byte per pixel in memory.
            self._gif.append(Image.fromarray(rgb).quantize(colors=256, method=Image.Quantize.MEDIANCUT))
        else:
            import cv2

            if self._writer is None:
                self._open_mp4(*rgb.shape[:2])
            self._writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        self.frames += 1

    def close(self) -> Path | None:
        """Write the file (atomically); None if no frame was added."""
        if self.fmt == "mp4":
            if self._writer is None:
                return None
            self._writer.release()
            self._writer = None
            os.replace(self._tmp, self.path)
            return self.path
        if not self._gif:
            return None
        first, rest = self._gif[0], self._gif[1:]
        with atomic_path(self.path, suffix=".gif") as tmp:
            first.save(tmp, format="GIF", save_all=True, append_images=rest, loop=0,
                       duration=max(20, round(1000.0 / self.fps)), disposal=1)
        self._gif = []
        return self.path

    def abort(self) -> None:
        """Drop everything (an interrupted episode leaves no file)."""
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
        self._gif = []
