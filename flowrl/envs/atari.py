"""Atari support: DeepMind preprocessing and short game names.

    from flowrl.envs.atari import resolve_short_name, wrap_deepmind
    creator = resolve_short_name("Breakout")       # picklable, travels to Ray actors
    env = creator(EnvContext({"training": True}))   # obs (84, 84, 4) uint8

Importing this module imports ``ale_py`` (when installed), which registers every
ALE id with gymnasium (``ALE/Breakout-v5``, ``BreakoutNoFrameskip-v4``, ...), and adds
the classic ``<Game>Deterministic-v0/v4`` ids that ale-py >= 0.9 no longer registers
(``PongDeterministic-v4``). Full ids are plain gymnasium envs (no preprocessing);
only short names (``"Breakout"``, ``"Pong"``, ``"SpaceInvaders"``, one per ALE v5 game)
get :func:`wrap_deepmind`.

Wrapper stack built by :func:`wrap_deepmind`, innermost first::

    AtariEnv (frameskip=1)
    AtariFrames            no-op reset, frame skip + max over the last 2 frames,
                           grayscale straight from ALE, INTER_AREA resize -> (84, 84)
    RecordEpisodeStatistics  info["episode"] = {"r", "l", "t"} at the end of a real game
    EpisodicLife           (training) life loss -> terminated=True, the game goes on
    FireReset              (games with FIRE) presses FIRE after every reset
    SignReward             (training) reward -> sign(reward)
    ChannelsLastFrameStack (84, 84, 4), repeats the first frame after a reset

``info["episode"]["r"]`` is the unclipped score of the whole game (all lives) and
``"l"`` its length in agent steps, including the FIRE steps taken on resets.

Why not gymnasium's own wrappers: ``AtariPreprocessing`` calls ``env.step`` (which
copies a screen) for every emulator frame, returns a stale frame when a game ends
inside the skip, and its ``terminal_on_life_loss`` makes the next ``reset`` restart
the whole game; ``FrameStackObservation`` stacks channels-first. ``RecordEpisodeStatistics``
is used as is.
"""

from __future__ import annotations

import collections
import re
from typing import TYPE_CHECKING, Any, SupportsFloat

import gymnasium as gym
import numpy as np

if TYPE_CHECKING:
    from flowrl.envs.context import EnvContext

try:  # optional dependency: importing ale_py registers the ALE ids with gymnasium
    import ale_py

    gym.register_envs(ale_py)
except ImportError:  # pragma: no cover - exercised only without ale-py
    ale_py = None


def _register_deterministic_ids() -> None:
    """Registers ``<Game>Deterministic-v0/v4`` where ale-py did not.

    ale-py >= 0.9 registers ``<Game>-v0/v4`` and ``<Game>NoFrameskip-v0/v4`` only; the
    classic gym ``Deterministic`` variants (fixed frameskip 4, 3 for SpaceInvaders, the
    sticky-action setting of their version) are rebuilt from the ``<Game>-vN`` specs.
    """
    for spec in list(gym.registry.values()):
        if (spec.namespace is not None or spec.version not in (0, 4)
                or spec.name.endswith("NoFrameskip")
                or spec.entry_point != "ale_py.env:AtariEnv"):
            continue
        env_id = f"{spec.name}Deterministic-v{spec.version}"
        if env_id in gym.registry:
            continue
        kwargs = dict(spec.kwargs)
        kwargs["frameskip"] = 3 if kwargs.get("game") == "space_invaders" else 4
        gym.register(id=env_id, entry_point=spec.entry_point, kwargs=kwargs,
                     max_episode_steps=spec.max_episode_steps)


if ale_py is not None:
    _register_deterministic_ids()

__all__ = [
    "AtariCreator", "AtariFrames", "ChannelsLastFrameStack", "EpisodicLife", "FireReset",
    "SignReward", "atari_game_names", "ensure_ale_registered", "resolve_short_name",
    "wrap_deepmind",
]

#: Sticky-action probability of short names: 0.0, the DeepMind / ``NoFrameskip-v4``
#: protocol that published Atari baselines use (v5 ids default to 0.25, Machado et al.).
#: Override with ``env_config["repeat_action_probability"]``.
DEFAULT_REPEAT_ACTION_PROBABILITY = 0.0

# Used only to tell "an Atari game, but ale-py is missing" from "unknown name";
# with ale-py installed the names come from gymnasium's registry of ALE/<Game>-v5.
_FALLBACK_GAME_NAMES = frozenset("""
    Adventure AirRaid Alien Amidar Assault Asterix Asteroids Atlantis Atlantis2 Backgammon
    BankHeist BasicMath BattleZone BeamRider Berzerk Blackjack Bowling Boxing Breakout
    Carnival Casino Centipede ChopperCommand CrazyClimber Crossbow Darkchambers Defender
    DemonAttack DonkeyKong DoubleDunk Earthworld ElevatorAction Enduro Entombed Et
    FishingDerby FlagCapture Freeway Frogger Frostbite Galaxian Gopher Gravitar Hangman
    HauntedHouse Hero HumanCannonball IceHockey Jamesbond JourneyEscape Kaboom Kangaroo
    KeystoneKapers KingKong Klax Koolaid Krull KungFuMaster LaserGates LostLuggage
    MarioBros MiniatureGolf MontezumaRevenge MrDo MsPacman NameThisGame Othello Pacman
    Phoenix Pitfall Pitfall2 Pong Pooyan PrivateEye Qbert Riverraid RoadRunner Robotank
    Seaquest SirLancelot Skiing Solaris SpaceInvaders SpaceWar StarGunner Superman Surround
    Tennis Tetris TicTacToe3D TimePilot Trondead Turmoil Tutankham UpNDown Venture
    VideoCheckers VideoChess VideoCube VideoPinball WizardOfWor WordZapper YarsRevenge Zaxxon
""".split())

_V5_ID = re.compile(r"ALE/(\w+)-v5")
_game_ids: dict[str, str] | None = None


def ensure_ale_registered() -> bool:
    """Makes sure the ALE ids are in ``gymnasium.registry``; False without ale-py.

    Importing this module already does it; the function exists so that callers can
    say so explicitly (e.g. before ``gym.make`` in a fresh Ray worker).
    """
    return ale_py is not None


def _require_ale() -> None:
    if ale_py is None:
        raise ImportError("Atari games need the ale-py package (it ships the ROMs): "
                          "pip install ale-py opencv-python-headless")


def _game_id_map() -> dict[str, str]:
    """Short name -> ``ALE/<Game>-v5`` for every game ALE ships (computed once)."""
    global _game_ids
    if _game_ids is None:
        _require_ale()
        found = {}
        for env_id in gym.registry:
            match = _V5_ID.fullmatch(env_id)
            if match:
                found[match.group(1)] = env_id
        _game_ids = found
    return _game_ids


def atari_game_names() -> list[str]:
    """The short names that :func:`resolve_short_name` accepts, e.g. ``"Breakout"``."""
    return sorted(_game_id_map())


# --------------------------------------------------------------------------- wrappers


def _ale_of(env: gym.Env) -> Any:
    ale = getattr(env.unwrapped, "ale", None)
    if ale is None:
        raise TypeError(f"{env} is not an ALE env (no env.unwrapped.ale)")
    return ale


def _steps_straight_to_ale(env: gym.Env) -> bool:
    """True when ``env`` is a discrete AtariEnv under pass-through wrappers only.

    Then ``ale.act`` may be called directly, skipping ``AtariEnv.step``'s per-frame
    screen copy and the wrapper calls; anything else (a TimeLimit, a user wrapper)
    is stepped through ``env.step`` so that its semantics are kept.
    """
    passthrough = (gym.wrappers.OrderEnforcing, gym.wrappers.PassiveEnvChecker)
    inner = env
    while isinstance(inner, gym.Wrapper):
        if type(inner) not in passthrough:
            return False
        inner = inner.env
    return (ale_py is not None and isinstance(inner, ale_py.AtariEnv)
            and not inner.continuous)


class AtariFrames(gym.Wrapper):
    """No-op reset, frame skip with max-pooling, grayscale, resize: obs ``(size, size)`` uint8.

    * ``reset``: a real game reset, then 1..``noop_max`` emulator frames of NOOP
      (drawn from the env's seeded ``np_random``; a game that ends meanwhile is reset
      again). Games without NOOP in their action set skip this.
    * ``step``: the action is repeated for ``frame_skip`` emulator frames, rewards
      summed; the observation is the pixel-wise max of the last two frames (Atari
      sprites flicker between frames). When the game ends inside the skip, the
      observation is the last frame reached.
    * frames come as grayscale straight from ALE (cheaper than converting RGB) and
      are resized with ``cv2.INTER_AREA``.

    The wrapped env must be an ALE env created with ``frameskip=1``; its own
    ``obs_type`` does not matter (``"grayscale"`` is the cheapest).
    """

    def __init__(self, env: gym.Env, noop_max: int = 30, frame_skip: int = 4,
                 screen_size: int = 84):
        super().__init__(env)
        try:
            import cv2
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise ImportError("Atari preprocessing needs OpenCV: "
                              "pip install opencv-python-headless") from e
        if frame_skip < 1:
            raise ValueError(f"frame_skip must be >= 1, got {frame_skip}")
        if noop_max < 0:
            raise ValueError(f"noop_max must be >= 0, got {noop_max}")
        if getattr(env.unwrapped, "_frameskip", 1) != 1:
            raise ValueError("wrap_deepmind/AtariFrames skip frames themselves: create the "
                             "ALE env with frameskip=1 (e.g. gym.make('ALE/Breakout-v5', "
                             "frameskip=1) or 'BreakoutNoFrameskip-v4')")
        self._resize = cv2.resize
        self._inter_area = cv2.INTER_AREA
        self.ale = _ale_of(env)
        self.frame_skip = int(frame_skip)
        self.screen_size = int(screen_size)
        meanings = env.unwrapped.get_action_meanings()
        self._noop = meanings.index("NOOP") if "NOOP" in meanings else None
        self.noop_max = int(noop_max) if self._noop is not None else 0
        self._direct = _steps_straight_to_ale(env)
        # ALE action for each action index, for the direct path (public API only).
        self._action_set = ([ale_py.Action.__members__[m] for m in meanings]
                            if self._direct else None)
        height, width = self.ale.getScreenDims()
        self._prev = np.zeros((height, width), dtype=np.uint8)
        self._cur = np.zeros((height, width), dtype=np.uint8)
        self.observation_space = gym.spaces.Box(
            0, 255, (self.screen_size, self.screen_size), dtype=np.uint8)

    def _info(self) -> dict[str, Any]:
        ale = self.ale
        return {"lives": ale.lives(), "episode_frame_number": ale.getEpisodeFrameNumber(),
                "frame_number": ale.getFrameNumber()}

    def _frame(self) -> np.ndarray:
        # A new array each call: callers may keep observations (frame stacks, buffers).
        return self._resize(self._cur, (self.screen_size, self.screen_size),
                            interpolation=self._inter_area)

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        _, info = self.env.reset(seed=seed, options=options)
        if self.noop_max > 0:
            noops = int(self.env.unwrapped.np_random.integers(1, self.noop_max + 1))
            for _ in range(noops):
                if self._direct:
                    self.ale.act(self._action_set[self._noop])
                    ended = self.ale.game_over()
                else:
                    _, _, terminated, truncated, info = self.env.step(self._noop)
                    ended = terminated or truncated
                if ended:
                    _, info = self.env.reset()
            if self._direct:
                info = self._info()
        self.ale.getScreenGrayscale(self._cur)
        return self._frame(), info

    def step(self, action: Any) -> tuple[np.ndarray, SupportsFloat, bool, bool, dict[str, Any]]:
        ale, prev = self.ale, self._prev
        second_last = self.frame_skip - 2
        reward = 0.0
        if self._direct:
            ale_action = self._action_set[action]
            for i in range(self.frame_skip):
                reward += ale.act(ale_action)
                if i == second_last:
                    ale.getScreenGrayscale(prev)
                if ale.game_over():  # includes truncation (max frames per episode)
                    break
            terminated = ale.game_over(with_truncation=False)
            truncated = ale.game_truncated()
            info = self._info()
        else:
            for i in range(self.frame_skip):
                _, r, terminated, truncated, info = self.env.step(action)
                reward += float(r)
                if i == second_last:
                    ale.getScreenGrayscale(prev)
                if terminated or truncated:
                    break
        cur = self._cur
        ale.getScreenGrayscale(cur)
        if i == self.frame_skip - 1 and i > 0:  # a full skip: max over the last 2 frames
            np.maximum(prev, cur, out=cur)
        return self._frame(), reward, terminated, truncated, info


class EpisodicLife(gym.Wrapper):
    """A lost life ends the (training) episode; only game over resets the game.

    ``step`` returns ``terminated=True`` when a life is lost but the game is not over;
    the following ``reset`` then leaves the emulator alone and returns the last
    observation. A reset after game over, truncation, mid-episode, or with a seed or
    options is a real one.
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.ale = _ale_of(env)
        self.lives = 0
        self._life_lost = False
        self._last_obs: Any = None

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        lives = self.ale.lives()
        self._life_lost = lives < self.lives and not (terminated or truncated)
        self.lives = lives
        if self._life_lost:
            terminated = True
            self._last_obs = obs
        return obs, reward, terminated, truncated, info

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        if self._life_lost and seed is None and options is None:
            self._life_lost = False
            return self._last_obs, {"lives": self.lives}
        self._life_lost = False
        obs, info = self.env.reset(seed=seed, options=options)
        self.lives = self.ale.lives()
        return obs, info


class FireReset(gym.Wrapper):
    """Presses FIRE after each reset (games that wait for FIRE to start or relaunch).

    If the FIRE step ends the episode, the env is reset once more; if it ended the
    whole game, that step's ``info["episode"]`` is passed on in the reset info.
    """

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.fire = env.unwrapped.get_action_meanings().index("FIRE")

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed, options=options)
        for _ in range(3):  # bounded: a game that ends on every FIRE must not hang us
            obs, _, terminated, truncated, step_info = self.env.step(self.fire)
            if not (terminated or truncated):
                return obs, info
            obs, info = self.env.reset()
            if "episode" in step_info:
                info = {**info, "episode": step_info["episode"]}
        return obs, info


class SignReward(gym.RewardWrapper):
    """Reward -> sign(reward) in {-1.0, 0.0, 1.0} (DeepMind's training-time clipping)."""

    def reward(self, reward: SupportsFloat) -> float:
        return 1.0 if reward > 0 else (-1.0 if reward < 0 else 0.0)


class ChannelsLastFrameStack(gym.Wrapper):
    """Stacks the last ``k`` 2-D frames along a new last axis: obs ``(h, w, k)``.

    After a reset every slot holds the first frame, so a replay buffer that stores each
    frame once can rebuild any stack from the episode's frames alone. Each observation
    is a new array (frames are never written in place).
    """

    def __init__(self, env: gym.Env, k: int = 4):
        super().__init__(env)
        if k < 1:
            raise ValueError(f"frame_stack must be >= 1, got {k}")
        space = env.observation_space
        if not isinstance(space, gym.spaces.Box) or len(space.shape) != 2:
            raise ValueError(f"ChannelsLastFrameStack needs 2-D Box frames, got {space}")
        import cv2
        self._merge = cv2.merge  # interleaves k frames channels-last in one C call
        self.k = int(k)
        self.frames: collections.deque = collections.deque(maxlen=self.k)
        self.observation_space = gym.spaces.Box(0, 255, space.shape + (self.k,),
                                                dtype=space.dtype)

    def _obs(self) -> np.ndarray:
        if self.k == 1:
            return self.frames[0][..., None].copy()
        return self._merge(list(self.frames))

    def reset(self, *, seed: int | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        frame, info = self.env.reset(seed=seed, options=options)
        self.frames.extend([frame] * self.k)
        return self._obs(), info

    def step(self, action: Any) -> tuple[np.ndarray, SupportsFloat, bool, bool, dict[str, Any]]:
        frame, reward, terminated, truncated, info = self.env.step(action)
        self.frames.append(frame)
        return self._obs(), reward, terminated, truncated, info


def wrap_deepmind(env: gym.Env, *, training: bool = True, frame_stack: int = 4,
                  noop_max: int = 30, frame_skip: int = 4, screen_size: int = 84,
                  clip_rewards: bool | None = None,
                  episodic_life: bool | None = None) -> gym.Env:
    """DeepMind Atari preprocessing on top of a raw ALE env created with ``frameskip=1``.

    Args:
        env: e.g. ``gym.make("ALE/Breakout-v5", frameskip=1, repeat_action_probability=0.0,
            obs_type="grayscale")`` or ``gym.make("BreakoutNoFrameskip-v4")``.
        training: default for ``clip_rewards`` and ``episodic_life``; evaluation envs
            (``training=False``) see true rewards and whole games.
        frame_stack: frames stacked channels-last; obs shape ``(size, size, frame_stack)``.
        noop_max: the no-op reset draws 1..noop_max emulator frames of NOOP (0: off).
        frame_skip: emulator frames per agent step (max over the last 2 is observed).
        screen_size: side of the square grayscale frame.
        clip_rewards: reward -> sign(reward); defaults to ``training``.
        episodic_life: a lost life ends the episode (the game goes on); defaults to
            ``training``.

    Returns:
        The wrapped env; ``observation_space == Box(0, 255, (84, 84, 4), uint8)`` by
        default. At the end of every real game the step's ``info["episode"]`` holds
        ``{"r": unclipped score, "l": agent steps, "t": seconds}``.
    """
    clip_rewards = training if clip_rewards is None else clip_rewards
    episodic_life = training if episodic_life is None else episodic_life
    env = AtariFrames(env, noop_max=noop_max, frame_skip=frame_skip, screen_size=screen_size)
    # Below life loss and clipping, so that it sees whole games and true scores.
    env = gym.wrappers.RecordEpisodeStatistics(env)
    if episodic_life:
        env = EpisodicLife(env)
    if "FIRE" in env.unwrapped.get_action_meanings():
        env = FireReset(env)
    if clip_rewards:
        env = SignReward(env)
    return ChannelsLastFrameStack(env, frame_stack)


# ------------------------------------------------------------------------ short names


_WRAP_KEYS = ("frame_stack", "noop_max", "frame_skip", "screen_size", "clip_rewards",
              "episodic_life")
_MAKE_KEYS = ("repeat_action_probability", "full_action_space", "mode", "difficulty",
              "max_num_frames_per_episode", "render_mode")


class AtariCreator:
    """Picklable creator ``fn(EnvContext) -> env`` of one game with DeepMind preprocessing.

    ``env_config`` keys read (others are ignored):

    * ``training`` (default True): reward clipping and episodic life on;
    * ``frame_stack``, ``noop_max``, ``frame_skip``, ``screen_size``, ``clip_rewards``,
      ``episodic_life``: passed to :func:`wrap_deepmind`;
    * ``repeat_action_probability`` (default 0.0, see
      :data:`DEFAULT_REPEAT_ACTION_PROBABILITY`), ``full_action_space``, ``mode``,
      ``difficulty``, ``max_num_frames_per_episode`` (default 108000 = 30 minutes),
      ``render_mode``: passed to ``gym.make``.
    """

    def __init__(self, env_id: str):
        self.env_id = env_id

    def __call__(self, ctx: EnvContext | dict | None = None) -> gym.Env:
        _require_ale()
        config = dict(ctx or {})
        make_kwargs = {"repeat_action_probability": DEFAULT_REPEAT_ACTION_PROBABILITY}
        make_kwargs.update({k: config[k] for k in _MAKE_KEYS if k in config})
        env = gym.make(self.env_id, frameskip=1, obs_type="grayscale", **make_kwargs)
        wrap_kwargs = {k: config[k] for k in _WRAP_KEYS if k in config}
        return wrap_deepmind(env, training=bool(config.get("training", True)), **wrap_kwargs)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AtariCreator) and other.env_id == self.env_id

    def __hash__(self) -> int:
        return hash(self.env_id)

    def __repr__(self) -> str:
        return f"wrap_deepmind(gymnasium.make({self.env_id!r}, frameskip=1))"


def resolve_short_name(name: str) -> AtariCreator | None:
    """``"Breakout"`` -> creator of ``ALE/Breakout-v5`` with DeepMind preprocessing.

    Every game ALE ships resolves (``Pong``, ``SpaceInvaders``, ``Qbert``, ...; exact
    PascalCase, or the same letters in any case). Returns None for other names.

    Raises:
        ImportError: ``name`` is an Atari game but ale-py is not installed.
    """
    if not isinstance(name, str):
        return None
    if ale_py is None:
        if name.lower() in {n.lower() for n in _FALLBACK_GAME_NAMES}:
            _require_ale()
        return None
    games = _game_id_map()
    env_id = games.get(name)
    if env_id is None:
        lowered = {n.lower(): i for n, i in games.items()}
        env_id = lowered.get(name.lower())
    return AtariCreator(env_id) if env_id is not None else None
