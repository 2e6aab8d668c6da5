"""Episode videos: one mp4 per recorded episode, from ``env.render()`` frames.

    env = gym.make("CartPole-v1", render_mode="rgb_array")
    env = EpisodeVideoRecorder(env, "videos", episode_trigger=lambda i: True)
    ...                      # episode 0 -> videos/episode_000000.mp4, written at its end
    env.close()              # also finishes a video whose episode is still running

``config["monitor"] = True`` puts a recorder on the first env of one rollout worker
(see :class:`~flowrl.workers.rollout_worker.RolloutWorker`), writing to
``<logdir>/videos`` with the :func:`capped_cubic_video_schedule`.

Atari training envs end their "episodes" at each lost life but report whole games
in ``info["episode"]`` (see :func:`flowrl.envs.episodes.env_reports_episodes`).
On such envs the recorder, wrapped outermost, keeps recording across lost lives and
ends a video only when the game is over (or truncated).

Frames are streamed to an ``ffmpeg`` process (moviepy's writer) as they come, so a
long game does not pile up in memory. The file is written under a hidden temporary
name and renamed when complete: a finished name is always a whole video.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, SupportsFloat

import gymnasium as gym
import numpy as np

from flowrl.envs.atari import AtariCreator
from flowrl.envs.episodes import env_reports_episodes
from flowrl.envs.registry import EnvContext, _CompatCreator, _GymnasiumCreator

logger = logging.getLogger(__name__)


def capped_cubic_video_schedule(episode_index: int) -> bool:
    """Records episodes 0, 1, 8, 27, ..., 729, 1000, then every 1000th."""
    if episode_index < 1000:
        return round(episode_index ** (1.0 / 3.0)) ** 3 == episode_index
    return episode_index % 1000 == 0


def _env_name(env: gym.Env) -> str:
    spec = getattr(env, "spec", None) or getattr(env.unwrapped, "spec", None)
    return spec.id if spec is not None else type(env.unwrapped).__name__


class EpisodeVideoRecorder(gym.Wrapper):
    """Writes ``<video_dir>/<name_prefix>_<episode:06d>.mp4`` for each triggered episode.

    Args:
        env: an env with ``render_mode == "rgb_array"``.
        video_dir: created if missing.
        episode_trigger: ``fn(episode_index) -> bool`` (0-based, counting every
            episode this wrapper saw); default :func:`capped_cubic_video_schedule`.
        name_prefix: start of the file names.
        fps: frames per second of the videos (default: the env's ``render_fps``, else 30).
        real_episodes: end videos only at whole-game ends reported in ``info["episode"]``
            (lost Atari lives do not end them); default: on when the env reports such
            stats.

    Attributes:
        videos: paths of the videos written so far.
        episode_index: index of the current episode (-1 before the first reset).

    A video holds the frame after ``reset`` and one frame per step, so an episode of
    ``n`` steps gives ``n + 1`` frames. It is finished at the episode's last step, on a
    reset in mid-episode, and on ``close()``.
    """

    def __init__(self, env: gym.Env, video_dir: str,
                 episode_trigger: Callable[[int], bool] | None = None,
                 name_prefix: str = "episode", fps: float | None = None,
                 real_episodes: bool | None = None):
        super().__init__(env)
        if env.render_mode != "rgb_array":
            raise ValueError(
                f"Cannot record videos of env {_env_name(env)!r}: its render_mode is "
                f"{env.render_mode!r}, and recording needs 'rgb_array' frames. Pass "
                "render_mode='rgb_array' through env_config (config['env_config']"
                "['render_mode'] = 'rgb_array') or create the env with it.")
        self.video_dir = os.path.abspath(os.path.expanduser(video_dir))
        os.makedirs(self.video_dir, exist_ok=True)
        self.episode_trigger = episode_trigger or capped_cubic_video_schedule
        self.name_prefix = name_prefix
        self.fps = float(fps or env.metadata.get("render_fps") or 30)
        self.real_episodes = env_reports_episodes(env) if real_episodes is None \
            else bool(real_episodes)
        self.videos: list[str] = []
        self.episode_index = -1
        self._in_episode = False
        self._life_lost = False  # the last step ended a life, not the game
        self._writer: Any = None
        self._recording = False
        self._tmp_path: str | None = None
        self._frame_shape: tuple | None = None
        self.frames_written = 0  # frames of the current / last video

    # -- gymnasium API --------------------------------------------------------------
    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed, options=options)
        continues = self._in_episode and self._life_lost and seed is None and options is None
        self._life_lost = False
        if not continues:
            self._finish_video()  # a reset in mid-episode ends it
            self.episode_index += 1
            self._in_episode = True
            self._recording = bool(self.episode_trigger(self.episode_index))
            self.frames_written = 0
        if self._recording:
            self._capture()
        return obs, info

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        if self._recording:
            self._capture()
        if terminated or truncated:
            if truncated or not self.real_episodes or "episode" in info:
                self._finish_video()
                self._in_episode = False
            else:
                self._life_lost = True
        return obs, reward, terminated, truncated, info

    def close(self) -> None:
        """Finishes a video in progress, then closes the env."""
        try:
            self._finish_video()
        finally:
            super().close()

    # -- writing --------------------------------------------------------------------
    def _capture(self) -> None:
        frame = self.env.render()
        if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3:
            raise ValueError(f"{_env_name(self.env)}: render() returned "
                             f"{type(frame).__name__} {getattr(frame, 'shape', '')}; "
                             "video recording needs (height, width, 3) RGB arrays.")
        frame = np.asarray(frame, dtype=np.uint8)
        # H.264 in yuv420p (what players and browsers show) needs even sides.
        pad_h, pad_w = frame.shape[0] % 2, frame.shape[1] % 2
        if pad_h or pad_w:
            frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        if self._writer is None:
            self._open_writer(frame.shape)
        elif frame.shape != self._frame_shape:
            raise ValueError(f"{_env_name(self.env)}: render() frames changed size from "
                             f"{self._frame_shape} to {frame.shape} within an episode.")
        self._writer.write_frame(np.ascontiguousarray(frame))
        self.frames_written += 1

    def _open_writer(self, shape: tuple) -> None:
        try:
            from moviepy.video.io.ffmpeg_writer import FFMPEG_VideoWriter
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise ImportError("Video recording needs moviepy: pip install moviepy") from e
        stem = f"{self.name_prefix}_{self.episode_index:06d}"
        self._tmp_path = os.path.join(self.video_dir, f".{stem}.tmp.mp4")
        self._frame_shape = shape
        self._writer = FFMPEG_VideoWriter(
            self._tmp_path, size=(shape[1], shape[0]), fps=self.fps,
            ffmpeg_params=["-pix_fmt", "yuv420p"])

    def _final_path(self) -> str:
        """A name not used yet (a restarted worker counts episodes from 0 again)."""
        stem = f"{self.name_prefix}_{self.episode_index:06d}"
        path, n = os.path.join(self.video_dir, f"{stem}.mp4"), 1
        while os.path.exists(path):
            path, n = os.path.join(self.video_dir, f"{stem}-{n}.mp4"), n + 1
        return path

    def _finish_video(self) -> None:
        self._recording = False
        writer, self._writer = self._writer, None
        if writer is None:
            return
        writer.close()
        path = self._final_path()
        os.replace(self._tmp_path, path)
        self.videos.append(path)
        logger.debug("Wrote %s (%d frames)", path, self.frames_written)


def make_recordable_env(env_creator: Callable[[EnvContext], Any],
                        ctx: EnvContext | None = None) -> Any:
    """``env_creator(ctx)``, asking for ``render_mode="rgb_array"`` where flowrl builds
    the env (gymnasium ids and Atari short names) and ``ctx`` names no render_mode.

    Custom creators are called as they are: their env must render RGB arrays itself
    (or read ``render_mode`` from its env_config).
    """
    ctx = ctx if ctx is not None else EnvContext({})
    inner = env_creator.creator if isinstance(env_creator, _CompatCreator) else env_creator
    if isinstance(inner, (_GymnasiumCreator, AtariCreator)) and "render_mode" not in ctx:
        ctx = EnvContext({**ctx, "render_mode": "rgb_array"}, ctx.worker_index,
                         ctx.vector_index, ctx.num_workers)
    return env_creator(ctx)
