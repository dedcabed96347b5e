"""VLMReasoner (planners/reasoner.py): prompt freezing, strict parsing that keeps the last valid reasoning, bad
instructions, and the OpenAI-compatible endpoint backend against a local HTTP server."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import numpy as np
import pytest
from PIL import Image

from ghil.types import Observation, Reasoning
from planners.ecot_format import render_reasoning
from planners.reasoner import FORCED_PREFIX, OpenAIChatBackend, ReasonerUnavailable, VLMReasoner, ecot_prompt

FULL = Reasoning(task="open the drawer", plan=("open the drawer",), visible_objects={"drawer handle": (10, 80, 40, 96)},
                 subtask_reasoning="the drawer is closed.", subtask="open the drawer",
                 move_reasoning="the handle is left.", move="move left", gripper_position=((100, 100), (90, 100)))
TEXT = render_reasoning(FULL)


def obs(t=0, instruction="open the drawer"):
    return Observation(images={"rgb_static": np.zeros((200, 200, 3), np.uint8)}, proprio=np.zeros(15), t=t,
                       instruction=instruction)


class Scripted:
    """A backend that answers from a list (each answer is the text after the prefix) and records its prompts."""

    def __init__(self, answers):
        self.answers, self.calls = list(answers), []

    def generate(self, image, prompt, prefix):
        self.calls.append((prompt, prefix))
        answer = self.answers.pop(0)
        return answer(prefix) if callable(answer) else answer


def continuation(prefix: str) -> str:
    return TEXT[len(prefix):] if TEXT.startswith(prefix) else TEXT


def test_full_every_n_steps_and_the_frozen_prefix_in_between():
    backend = Scripted([continuation] * 7)
    reasoner = VLMReasoner(backend, full_every=3)
    for t in range(7):
        assert reasoner.reason(obs(t)) == FULL
    prefixes = [p for _, p in backend.calls]
    frozen = TEXT[:TEXT.index("MOVE REASONING:")]
    assert prefixes == [FORCED_PREFIX, frozen, frozen, FORCED_PREFIX, frozen, frozen, FORCED_PREFIX]
    assert reasoner.n_full == 3 and reasoner.n_frozen == 4
    assert backend.calls[0][0] == ecot_prompt("open the drawer") == "What action should the robot take to open the drawer?"


def test_a_full_reasoning_that_changes_the_subtask_is_confirmed_by_another_full_one():
    lift = dataclasses.replace(FULL, subtask="lift the red block")
    lift_text = render_reasoning(lift)

    def answer(text):
        return lambda prefix: text[len(prefix):] if text.startswith(prefix) else text

    backend = Scripted([answer(TEXT), answer(TEXT), answer(lift_text), answer(lift_text), answer(lift_text),
                        answer(TEXT), answer(TEXT)])
    reasoner = VLMReasoner(backend, full_every=2)
    said = [reasoner.reason(obs(t)).subtask for t in range(7)]
    kinds = ["full" if p == FORCED_PREFIX else "frozen" for _, p in backend.calls]
    # t2: full, SUBTASK changed -> t3 full again (confirmed: unchanged) -> t4 frozen; t5 full changes it back -> t6 full
    assert kinds == ["full", "frozen", "full", "full", "frozen", "full", "full"]
    assert said == ["open the drawer", "open the drawer", "lift the red block", "lift the red block",
                    "lift the red block", "open the drawer", "open the drawer"]


def test_a_new_instruction_reasons_in_full_again():
    backend = Scripted([continuation] * 3)
    reasoner = VLMReasoner(backend, full_every=10)
    reasoner.reason(obs(0))
    reasoner.reason(obs(1))
    reasoner.reason(obs(2, "lift the red block"))
    assert [p for _, p in backend.calls][2] == FORCED_PREFIX


def test_malformed_output_keeps_the_last_valid_reasoning_and_is_reported():
    backend = Scripted([continuation, " garbage without tags", lambda p: continuation(p).replace("[100, 100", "[999, 100")])
    reasoner = VLMReasoner(backend, full_every=10)
    assert reasoner.reason(obs(0)) == FULL
    assert reasoner.reason(obs(1)) == FULL and reasoner.n_failures == 1
    assert reasoner.reason(obs(2)) == FULL and reasoner.n_failures == 2
    assert "outside the 200x200 image" in str(reasoner.last_error)
    assert [p for _, p in backend.calls][2] == FORCED_PREFIX  # after a failure the next step reasons in full


def test_before_any_valid_reasoning_the_instruction_is_the_subtask():
    reasoner = VLMReasoner(Scripted(["nonsense"]))
    r = reasoner.reason(obs(0))
    assert r.subtask == "open the drawer" and reasoner.fallback and reasoner.n_failures == 1


def test_known_subtasks_are_enforced():
    reasoner = VLMReasoner(Scripted([continuation]), subtasks=("lift the red block",))
    reasoner.reason(obs(0))
    assert reasoner.fallback and "not a known subtask" in str(reasoner.last_error)


@pytest.mark.parametrize("instruction, problem", [("", "empty"), ("x" * 513, "too long"), (b"\xff\xfe", "UTF-8"),
                                                  (None, "not a string")])
def test_bad_instructions_get_a_clear_error(instruction, problem):
    with pytest.raises(ValueError, match=problem):
        VLMReasoner(Scripted([])).reason(obs(0, instruction))


def test_construction_errors():
    with pytest.raises(TypeError):
        VLMReasoner(object())
    with pytest.raises(ValueError):
        VLMReasoner(Scripted([]), full_every=0)
    with pytest.raises(ValueError, match="camera"):
        VLMReasoner(Scripted([]), camera="rgb_gripper").reason(obs(0))


# -- the endpoint backend ---------------------------------------------------------------------------------------------


@pytest.fixture
def server():
    """A local OpenAI-compatible server: answers with ``reply(body)`` and records the request bodies."""
    state = {"bodies": [], "reply": lambda body: {"choices": [{"message": {"content": continuation(
        body["messages"][-1]["content"])}}]}}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state["bodies"].append((self.path, dict(self.headers), body))
            payload = state["reply"](body)
            data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield state
    httpd.shutdown()


def test_endpoint_backend_sends_image_prompt_and_prefix(server):
    backend = OpenAIChatBackend(server["url"], "my-vlm", api_key="k")
    reasoner = VLMReasoner(backend, full_every=2)
    frame = np.zeros((200, 200, 3), np.uint8)
    frame[5, 7] = (255, 0, 0)
    o = Observation(images={"rgb_static": frame}, proprio=np.zeros(15), t=0, instruction="open the drawer")
    assert reasoner.reason(o) == FULL
    path, headers, body = server["bodies"][0]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer k" and body["model"] == "my-vlm"
    user, assistant = body["messages"]
    url = user["content"][0]["image_url"]["url"]
    sent = np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))))
    assert np.array_equal(sent, frame)
    assert user["content"][1]["text"] == ecot_prompt("open the drawer")
    assert assistant == {"role": "assistant", "content": FORCED_PREFIX} and body["continue_final_message"] is True


def test_endpoint_backend_accepts_a_server_that_repeats_the_prefix(server):
    server["reply"] = lambda body: {"choices": [{"message": {"content": TEXT}}]}
    assert VLMReasoner(OpenAIChatBackend(server["url"], "m")).reason(obs(0)) == FULL


@pytest.mark.parametrize("reply, problem", [(b"not json", "other than JSON"), ({"error": "x"}, "without choices")])
def test_endpoint_backend_failures_are_contained(server, reply, problem):
    server["reply"] = lambda body: reply
    backend = OpenAIChatBackend(server["url"], "m")
    with pytest.raises(ReasonerUnavailable, match=problem):
        backend.generate(np.zeros((8, 8, 3), np.uint8), "p", FORCED_PREFIX)
    reasoner = VLMReasoner(backend)
    assert reasoner.reason(obs(0)).subtask == "open the drawer" and reasoner.fallback


def test_endpoint_backend_down_is_contained_and_backed_off():
    backend = OpenAIChatBackend("http://127.0.0.1:9/v1", "m", timeout_s=1.0)  # discard port: nothing listens
    reasoner = VLMReasoner(backend, backoff_calls=3)
    assert reasoner.reason(obs(0)).subtask == "open the drawer"
    assert isinstance(reasoner.last_error, ReasonerUnavailable) and "did not answer" in str(reasoner.last_error)
    for t in range(1, 5):
        reasoner.reason(obs(t))
    assert reasoner.n_failures == 2  # calls 1-3 skipped, call 4 asked again
    with pytest.raises(ValueError, match="http"):
        OpenAIChatBackend("localhost:8000", "m")


# -- transformers vision-language models (tiny random configs of two architectures) -----------------------------------


@pytest.fixture(scope="module", params=["llava", "idefics3"])
def tiny_vlm(request, tmp_path_factory):
    pytest.importorskip("transformers")
    import torch

    from _vlm_fixtures import tiny_idefics3, tiny_llava

    torch.manual_seed(0)
    build = {"llava": tiny_llava, "idefics3": tiny_idefics3}[request.param]
    return request.param, build(tmp_path_factory.mktemp(request.param))


def test_transformers_backend_loads_by_path_and_continues_the_forced_prefix(tiny_vlm):
    from planners.vlm_backend import TransformersVLM

    name, folder = tiny_vlm
    backend = TransformersVLM(str(folder), max_new_tokens=12, local_files_only=True)
    assert type(backend.model).__name__.lower().startswith(name[:5])
    text = backend.prompt_text(ecot_prompt("open the drawer"), FORCED_PREFIX)
    assert text.endswith("ASSISTANT: TASK:" if name == "llava" else "Assistant: TASK:")
    out = backend.generate(np.zeros((200, 200, 3), np.uint8), ecot_prompt("open the drawer"), FORCED_PREFIX)
    assert isinstance(out, str)
    again = backend.generate(np.zeros((200, 200, 3), np.uint8), ecot_prompt("open the drawer"), FORCED_PREFIX)
    assert out == again  # greedy decoding
    # An untrained model writes no valid reasoning: reported, and the instruction stands in as the subtask.
    reasoner = VLMReasoner(backend)
    assert reasoner.reason(obs(0)).subtask == "open the drawer" and reasoner.fallback and reasoner.n_failures == 1
    assert backend.prompt_text("q?", "TASK:").count("TASK:") == 1
    vicuna = TransformersVLM(str(folder), prompt_style="ecot_vicuna", local_files_only=True)
    assert vicuna.prompt_text("q?", "TASK:").endswith("USER: <image>\nq? ASSISTANT: TASK:")


def test_the_cached_greedy_decoder_writes_exactly_what_generate_writes(tiny_vlm):
    from planners.vlm_backend import TransformersVLM

    _, folder = tiny_vlm
    slow = TransformersVLM(str(folder), max_new_tokens=24, local_files_only=True)
    fast = TransformersVLM(str(folder), max_new_tokens=24, local_files_only=True, decode="cached_greedy")
    rng = np.random.default_rng(0)
    for k in range(4):
        image = rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)
        head = FORCED_PREFIX if k % 2 == 0 else "TASK: open the drawer. PLAN: 1."
        assert fast.generate(image, ecot_prompt("open the drawer"), head) == \
            slow.generate(image, ecot_prompt("open the drawer"), head)
    with pytest.raises(ValueError, match="decode"):
        TransformersVLM(str(folder), local_files_only=True, decode="beam")


def test_a_model_that_cannot_be_loaded_offline_says_so(tmp_path):
    pytest.importorskip("transformers")
    from planners.vlm_backend import TransformersVLM

    with pytest.raises(ReasonerUnavailable, match="not downloadable here"):
        TransformersVLM("no-such-org/no-such-vlm", local_files_only=True)
    with pytest.raises(ReasonerUnavailable, match="cannot load"):
        TransformersVLM(str(tmp_path), local_files_only=True)  # an empty folder
    with pytest.raises(ValueError, match="prompt_style"):
        TransformersVLM(str(tmp_path), prompt_style="alpaca")


# -- ReasonedAgent: the reasoner's subtask drives the lower stages ------------------------------------------------------


class RecordingAgent:
    """A runtime Agent that records the instruction of every observation it acts on and every reset."""

    from ghil.types import REL_EE as space

    def __init__(self):
        self.instructions, self.resets = [], 0

    def reset(self):
        self.resets += 1

    def act(self, obs):
        self.instructions.append(obs.instruction)
        return np.r_[np.zeros(6), 1.0]

    def describe(self):
        from ghil.types import AgentDescription

        return AgentDescription(status="inner")


class SubtaskScript:
    """A Reasoner that returns the subtask listed for each call."""

    def __init__(self, subtasks):
        self.subtasks, self.calls = list(subtasks), []

    def reason(self, o):
        self.calls.append((o.t, o.instruction))
        return Reasoning(task=o.instruction, subtask=self.subtasks.pop(0))


def test_the_subtask_becomes_the_instruction_and_a_new_subtask_resets_the_inner_agent():
    from ghil.runtime.reasoned_agent import ReasonedAgent

    inner = RecordingAgent()
    script = SubtaskScript(["open the drawer", "open the drawer", "lift the red block", ""])
    agent = ReasonedAgent(inner, script, reason_every=2)
    agent.reset()
    resets_after_reset = inner.resets
    composite = "open the drawer, then lift the red block"
    for t in range(8):
        agent.act(obs(t, composite))
    assert [t for t, _ in script.calls] == [0, 2, 4, 6]
    assert all(text == composite for _, text in script.calls)  # the reasoner always sees the user's instruction
    assert inner.instructions == ["open the drawer"] * 4 + ["lift the red block"] * 2 + [composite] * 2
    assert inner.resets - resets_after_reset == 2  # entering "lift ..." and the fallback to the instruction
    assert agent.subtasks_seen == ["open the drawer", "lift the red block", composite]
    description = agent.describe()
    assert description.status.startswith(f"subtask: {composite}") and description.reasoning.subtask == ""


class PlanScript:
    """A Reasoner whose every reasoning carries ``plan`` and the next scripted SUBTASK."""

    def __init__(self, plan, subtasks):
        self.plan, self.subtasks = tuple(plan), list(subtasks)

    def reason(self, o):
        return Reasoning(task=o.instruction, plan=self.plan, subtask=self.subtasks.pop(0))


def test_a_composite_plan_advances_one_step_at_a_time_after_repeated_evidence_and_never_back():
    from ghil.runtime.reasoned_agent import ReasonedAgent

    a, b, c = "open the drawer", "lift the red block", "push the button"
    said = [b, a, b, b, a, c, c, c, a, a, c]   # at t = 0 .. 10, one reasoning per step
    inner = RecordingAgent()
    agent = ReasonedAgent(inner, PlanScript((a, b, c), said), reason_every=1, advance_after=2)
    agent.reset()
    for t in range(len(said)):
        agent.act(obs(t, f"{a}, then {b}, then {c}"))
    # t0: starts at the plan's first step although the reasoner said b; t2-t3: b twice in a row -> b; t4: an earlier
    # step is ignored; t5-t6: c twice -> c; later a's never undo it.
    assert inner.instructions == [a, a, a, b, b, b, c, c, c, c, c]
    assert agent.subtasks_seen == [a, b, c]


def test_a_skipped_step_or_unknown_subtask_leaves_the_current_one_in_force():
    from ghil.runtime.reasoned_agent import ReasonedAgent

    a, b, c = "open the drawer", "lift the red block", "push the button"
    said = [a, c, c, c, "dance", "dance", b, b]
    inner = RecordingAgent()
    agent = ReasonedAgent(inner, PlanScript((a, b, c), said), reason_every=1, advance_after=2)
    agent.reset()
    for t in range(len(said)):
        agent.act(obs(t, f"{a}, then {b}, then {c}"))
    assert inner.instructions == [a] * 7 + [b]
    agent.reset()  # a new episode starts at the first step again
    agent.reasoner.subtasks = [b]
    agent.act(obs(0, f"{a}, then {b}, then {c}"))
    assert inner.instructions[-1] == a


def test_the_same_reasoning_object_again_is_no_new_evidence():
    from ghil.runtime.reasoned_agent import PlanFollower

    a, b = "open the drawer", "lift the red block"
    follower = PlanFollower(advance_after=2)
    first, said_b = Reasoning(task="x", plan=(a, b), subtask=a), Reasoning(task="x", plan=(a, b), subtask=b)
    assert follower.update(first) == a
    assert follower.update(said_b) == a and follower.update(said_b) == a  # an async reasoner repeating its last
    assert follower.update(dataclasses.replace(said_b)) == b  # a second, new reasoning naming b


def test_advance_after_one_follows_the_reasoner_at_once():
    from ghil.runtime.reasoned_agent import ReasonedAgent

    a, b = "open the drawer", "lift the red block"
    inner = RecordingAgent()
    agent = ReasonedAgent(inner, PlanScript((a, b), [a, b, a]), reason_every=1, advance_after=1)
    agent.reset()
    for t in range(3):
        agent.act(obs(t, f"{a}, then {b}"))
    assert inner.instructions == [a, b, b]


def test_reasoned_agent_checks_its_parts():
    from ghil.runtime.reasoned_agent import ReasonedAgent

    with pytest.raises(TypeError):
        ReasonedAgent(object(), SubtaskScript([]))
    with pytest.raises(TypeError):
        ReasonedAgent(RecordingAgent(), object())
    with pytest.raises(ValueError):
        ReasonedAgent(RecordingAgent(), SubtaskScript([]), reason_every=0)
    with pytest.raises(ValueError):
        ReasonedAgent(RecordingAgent(), SubtaskScript([]), advance_after=0)


@pytest.mark.slow
def test_agent_ghil_glue_reasoner_runs_the_shipped_hierarchy_on_the_reasoners_subtask(server):
    """The config composes reasoner -> generator -> filter -> policy; the endpoint's SUBTASK reaches the generator."""
    pytest.importorskip("torch")
    from hydra import compose, initialize_config_dir

    from ghil.paths import CONFIG_DIR
    from sim_eval.evaluation.evaluate import build_agent
    from sim_eval.world.playtable.env import PlayTableEnv

    lift = Reasoning(task="lift the red block", plan=("lift the red block",),
                     subtask="lift the red block", move="move down", gripper_position=((100, 100),))
    server["reply"] = lambda body: {"choices": [{"message": {"content": render_reasoning(lift)[len("TASK:"):]}}]}
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="run", overrides=["agent=ghil_glue_reasoner", "reasoner@agent.reasoner=endpoint",
                                                    f"agent.reasoner.backend.base_url={server['url']}"])
    agent = build_agent(cfg.agent)
    env = PlayTableEnv()
    try:
        observation = env.reset()
        agent.reset()
        for _ in range(3):
            action = agent.step(observation, "lift the red block")
            observation, *_ = env.step(action)
    finally:
        env.close()
    reasoned = agent.agent
    assert reasoned.subtasks_seen == ["lift the red block"]
    assert reasoned.agent.goals._instruction == "lift the red block"  # the generator imagined the subtask
    assert agent.describe().reasoning == lift and len(server["bodies"]) == 1


# -- AsyncReasoner: the freshest complete reasoning --------------------------------------------------------------------


class SlowReasoner:
    """Takes ``delay`` seconds per reasoning; its subtask names the step it reasoned about."""

    def __init__(self, delay=0.05, fail_at=None):
        self.delay, self.fail_at, self.seen, self.resets = delay, fail_at, [], 0

    def reset(self):
        self.resets += 1

    def reason(self, o):
        import time

        time.sleep(self.delay)
        self.seen.append(o.t)
        if self.fail_at is not None and o.t >= self.fail_at:
            raise RuntimeError("the VLM crashed")
        return Reasoning(task=o.instruction, subtask=f"step {o.t}")


def test_async_reasoner_answers_the_first_call_then_returns_the_freshest_complete_result():
    import time

    from ghil.runtime.async_reasoner import AsyncReasoner

    inner = SlowReasoner(delay=0.05)
    with AsyncReasoner(inner) as reasoner:
        assert reasoner.reason(obs(0)).subtask == "step 0"  # synchronous first answer
        start = time.perf_counter()
        answers = [reasoner.reason(obs(t)).subtask for t in range(1, 30)]
        assert time.perf_counter() - start < 0.05 * 5  # the loop never waited for the slow reasoner
        assert reasoner.wait_idle(2.0)
        latest = reasoner.reason(obs(30)).subtask
        assert answers[0] == "step 0" and latest != "step 0"
        assert len(inner.seen) < 30  # newest observation wins: stale ones are skipped
        steps = [int(a.split()[1]) for a in answers]
        assert steps == sorted(steps)  # never an older result after a newer one
        reasoner.reset()
        assert inner.resets == 1 and reasoner.reason(obs(0)).subtask == "step 0"


def test_reasoned_agent_can_run_its_reasoner_asynchronously():
    from ghil.runtime.async_reasoner import AsyncReasoner
    from ghil.runtime.reasoned_agent import ReasonedAgent

    inner = RecordingAgent()
    agent = ReasonedAgent(inner, SlowReasoner(delay=0.01), reason_every=1, asynchronous=True)
    assert isinstance(agent.reasoner, AsyncReasoner)
    agent.reset()
    for t in range(5):
        agent.act(obs(t))
    assert inner.instructions[0] == "step 0" and all(i.startswith("step ") for i in inner.instructions)
    agent.reasoner.close()


def test_async_reasoner_contains_a_crash_and_keeps_the_last_reasoning():
    from ghil.runtime.async_reasoner import AsyncReasoner

    with AsyncReasoner(SlowReasoner(delay=0.0, fail_at=1)) as reasoner:
        assert reasoner.reason(obs(0)).subtask == "step 0"
        reasoner.reason(obs(1))
        assert reasoner.wait_idle(2.0)
        assert reasoner.errors == 1 and reasoner.reason(obs(2)).subtask == "step 0"
    with pytest.raises(TypeError):
        AsyncReasoner(object())
