"""Generated subgoals (planners/subgoals.py): generator + filter as one GoalProvider under PolicyAgent. The filter's
argmax is kept (FirstCandidate keeps the first); replans fall exactly every replan_every env steps whatever the
policy's exec_len divides; unusable scores fall back to candidate 0 with one warning per episode; an unusable
generator output keeps the previous subgoal (an error when there is none); a video generator's clip is followed
frame by frame; a tiny DiT policy + generator stub + tiny filter act in range, reproducibly; and the agent configs
(agent=ghil_glue, susie, ghil_glue_video) build this composition from checkpoint paths."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from _policy_fixtures import SIZE, fake_stats, tiny_config
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from ghil.interfaces import GoalProvider, Seedable
from ghil.nn.encoders import HashTextConfig, ResNetGNConfig
from ghil.paths import CONFIG_DIR
from ghil.runtime.policy_agent import PolicyAgent
from ghil.types import REL_EE, ActionChunk, Observation
from planners.ghil_glue_filter import FirstCandidate, GhilGlueFilter, GhilGlueFilterConfig
from planners.image_generator import NonFiniteSubgoalError
from planners.subgoals import GeneratedSubgoals
from policies.dit import DiTPolicy

torch.set_num_threads(1)
LOGGER = "planners.subgoals"


class StubGenerator:
    """K random (seeded) candidate frames per call; records the step of every call. ``bad`` maps a call index to
    what that call returns instead (an array, or an exception to raise)."""

    def __init__(self, size: int = SIZE, bad: dict | None = None):
        self.size, self.bad = size, dict(bad or {})
        self.calls: list[int] = []
        self.seed(0)

    def seed(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)

    def propose(self, obs: Observation, subtask: str, n_candidates: int) -> np.ndarray:
        self.calls.append(obs.t)
        bad = self.bad.get(len(self.calls) - 1)
        if isinstance(bad, Exception):
            raise bad
        if bad is not None:
            return bad
        return self.rng.integers(0, 256, (n_candidates, self.size, self.size, 3), dtype=np.uint8)


class StubVideoGenerator(StubGenerator):
    """Clips of ``n_frames`` frames spanning ``config.horizon`` steps; frame j of candidate i is filled with
    10 * j + i, so a test can tell which frame of which clip it got."""

    def __init__(self, n_frames: int = 4, horizon: int = 16):
        super().__init__()
        self.n_frames, self.config = n_frames, SimpleNamespace(horizon=horizon)

    def propose_clips(self, obs: Observation, subtask: str, n_candidates: int) -> np.ndarray:
        self.calls.append(obs.t)
        values = 10 * np.arange(self.n_frames)[None, :] + np.arange(n_candidates)[:, None]  # (K, T)
        return np.broadcast_to(values[:, :, None, None, None], (n_candidates, self.n_frames, SIZE, SIZE, 3)).astype(
            np.uint8)


class FixedScores:
    """A filter returning the given scores; records the candidates' shapes."""

    def __init__(self, scores):
        self.scores, self.seen = scores, []

    def score(self, obs, candidates, subtask):
        self.seen.append(candidates.shape)
        return self.scores


class ZeroPolicy:
    """A goal-conditioned ChunkPolicy predicting ``exec_len`` still actions (gripper open)."""

    space, cameras, image_sizes, goal_camera = REL_EE, ("rgb_static",), (SIZE,), "rgb_static"
    uses_goal, uses_language = True, False

    def __init__(self, exec_len: int):
        self.exec_len = exec_len
        self.goals: list[np.ndarray] = []

    def predict_chunk(self, obs, goal=None, n_steps=None, generator=None):
        self.goals.append(goal)
        actions = torch.zeros(self.exec_len, 7)
        actions[:, 6] = 1.0
        return ActionChunk(actions=actions, t0=obs.t)


def obs_at(t: int, instruction: str = "open the drawer", cameras=("rgb_static",)) -> Observation:
    rng = np.random.default_rng(t)
    return Observation(images={c: rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for c in cameras},
                       proprio=rng.normal(size=15).astype(np.float32), t=t, instruction=instruction)


def run_agent(agent, n_steps: int, **obs_kwargs) -> list[np.ndarray]:
    agent.reset()
    return [agent.act(obs_at(t, **obs_kwargs)) for t in range(n_steps)]


def tiny_filter() -> GhilGlueFilter:
    torch.manual_seed(0)
    return GhilGlueFilter(GhilGlueFilterConfig(
        image_size=SIZE, encoder_size=SIZE, width=16, hidden=(32,), text_encoder=HashTextConfig(16),
        image_encoder=ResNetGNConfig(channels=(8, 16), blocks=(1, 1), stem_pool=False, groups=4))).eval()


# -- choosing ---------------------------------------------------------------------------------------------------


def test_the_filters_argmax_is_kept_with_its_candidates_and_scores():
    goals = GeneratedSubgoals(StubGenerator(), FixedScores([0.1, 0.9, 0.3, -1.0]), n_candidates=4)
    assert isinstance(goals, GoalProvider) and isinstance(goals, Seedable)
    goals.reset()
    sub = goals.goal(obs_at(0))
    assert sub.chosen == 1 and sub.candidates.shape == (4, SIZE, SIZE, 3) and sub.clip is None
    assert np.array_equal(sub.image, sub.candidates[1]) and sub.scores.tolist() == [0.1, 0.9, 0.3, -1.0]
    assert sub.source == "StubGenerator"
    # A few non-finite scores are left out of the argmax.
    goals = GeneratedSubgoals(StubGenerator(), FixedScores([np.nan, 0.2, np.inf, 0.5]), n_candidates=4)
    assert goals.goal(obs_at(0)).chosen == 3


def test_the_none_filter_keeps_the_first_candidate():
    goals = GeneratedSubgoals(StubGenerator(), FirstCandidate(), n_candidates=3)
    sub = goals.goal(obs_at(0))
    assert sub.chosen == 0 and np.array_equal(sub.image, sub.candidates[0]) and sub.scores.tolist() == [0, -1, -2]


def test_a_real_filter_is_used_through_one_batched_call():
    gen = StubGenerator()
    goals = GeneratedSubgoals(gen, tiny_filter(), n_candidates=5)
    sub = goals.goal(obs_at(0))
    assert gen.calls == [0] and sub.scores.shape == (5,) and sub.chosen == int(np.argmax(sub.scores))


# -- the cadence ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exec_len", [1, 4, 5, 10, 20])
def test_replans_exactly_every_replan_every_env_steps(exec_len):
    gen = StubGenerator()
    agent = PolicyAgent(ZeroPolicy(exec_len), GeneratedSubgoals(gen, FirstCandidate(), n_candidates=2,
                                                                replan_every=20))
    run_agent(agent, 100)
    assert gen.calls == [0, 20, 40, 60, 80]
    assert agent.goals.n_replans == 5


def test_an_exec_len_that_does_not_divide_replan_every_is_warned_once(caplog):
    gen = StubGenerator()
    agent = PolicyAgent(ZeroPolicy(8), GeneratedSubgoals(gen, FirstCandidate(), n_candidates=2, replan_every=20))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        run_agent(agent, 100)
        run_agent(agent, 30)
    assert gen.calls == [0, 24, 48, 72, 96, 0, 24]  # the first request at least 20 steps after the last replan
    warnings = [r.getMessage() for r in caplog.records if "does not divide" in r.getMessage()]
    assert len(warnings) == 1 and "every 24 steps" in warnings[0]


def test_counted_clock_for_observations_without_a_step_and_immediate_replans():
    # obs.t left at 0 (a robot node that does not count): exec_len makes the clock count requests.
    gen = StubGenerator()
    goals = GeneratedSubgoals(gen, FirstCandidate(), n_candidates=2, replan_every=20, exec_len=4)
    for _ in range(25):
        goals.goal(obs_at(0))
    assert len(gen.calls) == 5
    # A new instruction, a clock running backwards (new episode without reset) and reset() replan at once.
    gen = StubGenerator()
    goals = GeneratedSubgoals(gen, FirstCandidate(), n_candidates=2, replan_every=20)
    goals.goal(obs_at(0))
    goals.goal(obs_at(4))
    goals.goal(obs_at(8, instruction="lift the red block"))
    goals.goal(obs_at(2, instruction="lift the red block"))
    goals.goal(obs_at(6, instruction="lift the red block"))
    goals.reset()
    goals.goal(obs_at(10, instruction="lift the red block"))
    assert gen.calls == [0, 8, 2, 10]


# -- robustness -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scores, recorded", [([np.nan, np.nan, np.nan], "nan"), ([np.inf, -np.inf, np.nan], "nan"),
                                              ([0.1, 0.2], None), ("not scores", None)])
def test_unusable_scores_fall_back_to_the_first_candidate_warned_once_per_episode(scores, recorded, caplog):
    goals = GeneratedSubgoals(StubGenerator(), FixedScores(scores), n_candidates=3, replan_every=4)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        subs = [goals.goal(obs_at(t)) for t in range(0, 12, 4)]  # three replans
        assert len(caplog.records) == 1
        goals.reset()
        goals.goal(obs_at(0))
        assert len(caplog.records) == 2  # again in the next episode
    assert all(s.chosen == 0 and np.array_equal(s.image, s.candidates[0]) for s in subs)
    assert goals.n_fallbacks == 1 and "keeping candidate 0" in caplog.records[0].getMessage()
    assert (subs[0].scores is None) == (recorded is None)


@pytest.mark.parametrize("bad", [
    np.full((3, SIZE, SIZE, 3), np.nan, np.float32),                 # a non-finite image
    np.zeros((3, SIZE, SIZE, 3), np.float32),                        # float, not uint8
    np.zeros((2, SIZE, SIZE, 3), np.uint8),                          # fewer candidates than asked
    np.zeros((3, 16, 16, 3), np.uint8),                              # not the camera's frame size
    np.zeros((SIZE, SIZE, 3), np.uint8),                             # one image, no candidate axis
    NonFiniteSubgoalError("NaN pixels"),                             # the generator's own NaN check
], ids=["nan", "float", "few", "size", "ndim", "raised"])
def test_an_unusable_generator_output_keeps_the_previous_subgoal(bad, caplog):
    gen = StubGenerator(bad={1: bad, 2: bad})
    goals = GeneratedSubgoals(gen, FirstCandidate(), n_candidates=3, replan_every=8)
    first = goals.goal(obs_at(0))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert goals.goal(obs_at(8)) is first  # rejected: the previous subgoal stays
        assert goals.goal(obs_at(10)) is first  # retried at the next request, rejected again
    newer = goals.goal(obs_at(12))  # retried, accepted
    assert gen.calls == [0, 8, 10, 12] and newer is not first and goals.n_rejected == 2
    assert len(caplog.records) == 1 and "keeping the previous subgoal" in caplog.records[0].getMessage()


def test_an_unusable_first_generator_output_is_a_clear_error():
    goals = GeneratedSubgoals(StubGenerator(bad={0: np.full((2, SIZE, SIZE, 3), np.nan)}), FirstCandidate(),
                              n_candidates=2)
    with pytest.raises(RuntimeError, match="no previous subgoal to keep"):
        goals.goal(obs_at(0))


def test_bad_arguments_and_observations():
    with pytest.raises(ValueError, match="n_candidates"):
        GeneratedSubgoals(StubGenerator(), FirstCandidate(), n_candidates=0)
    with pytest.raises(ValueError, match="replan_every"):
        GeneratedSubgoals(StubGenerator(), FirstCandidate(), replan_every=0)
    with pytest.raises(TypeError, match="SubgoalGenerator"):
        GeneratedSubgoals(object(), FirstCandidate())
    with pytest.raises(TypeError, match="SubgoalFilter"):
        GeneratedSubgoals(StubGenerator(), object())
    goals = GeneratedSubgoals(StubGenerator(), FirstCandidate(), n_candidates=2)
    with pytest.raises(ValueError, match="instruction"):
        goals.goal(obs_at(0, instruction=""))
    with pytest.raises(ValueError, match="lacks"):
        goals.goal(obs_at(0, cameras=("rgb_gripper",)))


# -- video ------------------------------------------------------------------------------------------------------


def test_a_video_generators_clip_is_scored_on_its_last_frame_and_followed_frame_by_frame():
    gen, filt = StubVideoGenerator(n_frames=4, horizon=16), FixedScores([0.0, 0.1, 0.9])
    policy = ZeroPolicy(4)
    agent = PolicyAgent(policy, GeneratedSubgoals(gen, filt, n_candidates=3, replan_every=16, follow_clip=True,
                                                  clip_lead=4))
    run_agent(agent, 20)
    assert gen.calls == [0, 16] and filt.seen[0] == (3, 4, SIZE, SIZE, 3)
    # Chosen clip 2; requests at 0, 4, 8, 12 steps after the replan get the frames showing 4, 8, 12, 16 steps ahead.
    assert [int(g[0, 0, 0]) for g in policy.goals] == [2, 12, 22, 32, 2]
    sub = agent.describe().subgoal
    assert sub.clip.shape == (4, SIZE, SIZE, 3) and sub.chosen == 2 and sub.candidates.ndim == 5
    # Without follow_clip the goal is the chosen clip's last frame throughout.
    policy = ZeroPolicy(4)
    agent = PolicyAgent(policy, GeneratedSubgoals(StubVideoGenerator(), FixedScores([0.0, 0.1, 0.9]),
                                                  n_candidates=3, replan_every=16))
    run_agent(agent, 16)
    assert [int(g[0, 0, 0]) for g in policy.goals] == [32] * 4


# -- end to end -------------------------------------------------------------------------------------------------


def _dit(tmp_path=None):
    torch.manual_seed(0)
    policy = DiTPolicy(tiny_config(use_goal=True))
    policy.fit_normalizer(fake_stats())
    if tmp_path is not None:
        policy.save_pretrained(tmp_path / "policy")
    return policy


def test_policy_agent_with_a_tiny_dit_generator_and_filter_acts_in_range_reproducibly():
    cameras = ("rgb_static", "rgb_gripper")

    def build():
        return PolicyAgent(_dit(), GeneratedSubgoals(StubGenerator(), tiny_filter(), n_candidates=3,
                                                     replan_every=8), exec_len=4, seed=0)

    agent = build()
    actions = np.stack(run_agent(agent, 16, cameras=cameras))
    assert actions.shape == (16, 7) and np.isfinite(actions).all()
    assert (np.abs(actions) <= 1.0).all() and set(actions[:, 6].tolist()) <= {-1.0, 1.0}
    sub = agent.describe().subgoal
    assert sub.candidates.shape == (3, SIZE, SIZE, 3) and sub.chosen == int(np.argmax(sub.scores))
    assert agent.goals.n_replans == 2 and agent.goals.generator.calls == [0, 8]
    again = build()
    again.seed(0)
    np.testing.assert_array_equal(np.stack(run_agent(again, 16, cameras=cameras)), actions)


def _agent_from_config(name: str, tmp_path, generator: str, *more: str, trained_filter: bool = True):
    _dit(tmp_path)
    tiny_filter().save_pretrained(tmp_path / "filter")
    overrides = [f"agent={name}", f"agent.policy.path={tmp_path / 'policy'}",
                 f"agent.goals.generator._target_=test_subgoals.{generator}", "~agent.goals.generator.path", *more]
    if trained_filter:
        overrides.append(f"agent.goals.filter.path={tmp_path / 'filter'}")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=overrides)
    return instantiate(cfg.agent, _convert_="all")


@pytest.mark.parametrize("name, generator, filter_type, n_candidates", [
    ("ghil_glue", "StubGenerator", GhilGlueFilter, 4),
    ("susie", "StubGenerator", FirstCandidate, 1),
    ("ghil_glue_video", "StubVideoGenerator", GhilGlueFilter, 4),
])
def test_agent_configs_compose_the_hierarchy_from_checkpoints(name, generator, filter_type, n_candidates, tmp_path):
    agent = _agent_from_config(name, tmp_path, generator, trained_filter=filter_type is GhilGlueFilter)
    goals = agent.goals
    assert isinstance(agent, PolicyAgent) and isinstance(goals, GeneratedSubgoals)
    assert type(goals.filter) is filter_type and goals.n_candidates == n_candidates and agent.exec_len == 4
    assert goals.follow_clip == (name == "ghil_glue_video")
    actions = np.stack(run_agent(agent, 8, cameras=("rgb_static", "rgb_gripper")))
    assert np.isfinite(actions).all() and (np.abs(actions) <= 1.0).all()
    assert agent.describe().subgoal.candidates.shape[0] == n_candidates


def test_the_filter_is_a_hydra_group_choice_in_every_agent(tmp_path):
    agent = _agent_from_config("ghil_glue", tmp_path, "StubGenerator", "filter@agent.goals.filter=none",
                               trained_filter=False)
    assert type(agent.goals.filter) is FirstCandidate


@pytest.mark.parametrize("option", ["susie_tiny", "video_tiny"])
def test_the_real_tiny_generators_compose_with_the_filter(option):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["recipe=generator", f"generator={option}", "text_encoder=hash"])
    torch.manual_seed(0)
    generator = instantiate(cfg.generator, _convert_="all")
    video = option == "video_tiny"
    policy = ZeroPolicy(2)
    agent = PolicyAgent(policy, GeneratedSubgoals(generator, tiny_filter(), n_candidates=2, replan_every=4,
                                                  follow_clip=video, clip_lead=2), seed=0)
    run_agent(agent, 8)
    sub = agent.describe().subgoal
    assert agent.goals.n_replans == 2 and sub.scores.shape == (2,) and sub.chosen == int(np.argmax(sub.scores))
    assert sub.candidates.shape == ((2, generator.n_frames, SIZE, SIZE, 3) if video else (2, SIZE, SIZE, 3))
    assert (sub.clip is not None) == video and sub.source == generator.type_name
    if video:  # frame 0 of the chosen clip (2 steps ahead), then frame 1 (4 steps ahead), per replan
        assert np.array_equal(policy.goals[-2], sub.clip[0]) and np.array_equal(policy.goals[-1], sub.clip[1])


class GuidedStub(StubGenerator):
    """A generator whose propose takes sampler steps and guidance scales; records what each call was given."""

    sampler = SimpleNamespace(check_steps=lambda n: None)

    def __init__(self):
        super().__init__()
        self.given: list[dict] = []

    def propose(self, obs, subtask, n_candidates, n_steps=None, image_guidance=None, text_guidance=None):
        self.given.append({"n_steps": n_steps, "image_guidance": image_guidance, "text_guidance": text_guidance})
        return super().propose(obs, subtask, n_candidates)


def test_steps_and_guidance_reach_the_method_a_replan_calls():
    gen = GuidedStub()
    goals = GeneratedSubgoals(gen, FirstCandidate(), n_candidates=2, n_steps=4, image_guidance=1.0,
                              text_guidance=2.5)
    goals.goal(Observation(images={"rgb_static": np.zeros((SIZE, SIZE, 3), np.uint8)}, proprio=np.zeros(15), t=0,
                           instruction="open the drawer"))
    assert gen.given == [{"n_steps": 4, "image_guidance": 1.0, "text_guidance": 2.5}]
    # A video generator is asked through propose_clips: guidance is checked against that method at build time,
    # even when another of its methods (here generate) would take it.
    video = StubVideoGenerator()
    video.generate = lambda obs, subtask, n, image_guidance=None, text_guidance=None: None
    with pytest.raises(ValueError, match="takes no guidance"):
        GeneratedSubgoals(video, FirstCandidate(), image_guidance=1.0)
    with pytest.raises(ValueError, match="finite"):
        GeneratedSubgoals(gen, FirstCandidate(), text_guidance=float("inf"))
