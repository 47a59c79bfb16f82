"""Multi-turn episodes (issue 15): token in / token out, loss masks, both budgets, the turn
limit, tools that hang / raise / flood, the single-turn path unchanged, APRIL's episodes."""

import time

import torch

from longrl.models.tiny import TOOL_TOKENS, build_tiny_tokenizer
from longrl.rollout.base import RolloutRequest, SamplingParams
from longrl.rollout.engine import Generation
from longrl.rollout.episodes import (NoTools, TagFormat, ToolEnvironment, TurnLimits, episode_metrics,
                                     model_text, observation_mask, pick_format, run_episodes)

TOK = build_tiny_tokenizer(TOOL_TOKENS)


def ids(text):
    return TOK(text, add_special_tokens=False)["input_ids"]


class Scripted:
    """A backend that plays scripted turns: the k-th call to generate returns, for each
    request, the next text of its episode's script (keyed by the request's prompt prefix)."""

    name, supports_partial, policy_version = "scripted", False, 0

    def __init__(self, scripts):
        self.scripts = scripts  # prompt text -> list of turn texts
        self.calls = []

    def generate(self, requests, sampling, generator=None):
        self.calls.append((requests, sampling))
        out = []
        for r in requests:
            for _ in range(r.n):
                context = TOK.decode(r.prompt_ids, skip_special_tokens=False)
                prompt = next(p for p in self.scripts if context.startswith(p))
                turn = sum(context.count(t) for t in ("</result>",))
                text = self.scripts[prompt][turn]
                toks = ids(text)
                if text.endswith("<|endoftext|>"):
                    toks = ids(text[: -len("<|endoftext|>")]) + [TOK.eos_token_id]
                cut = toks[: sampling.max_new_tokens]
                finish = "stop" if cut and (cut[-1] == TOK.eos_token_id or cut[-1] in sampling.stop_ids) else "length"
                out.append(Generation(cut, [-0.5] * len(cut), finish))
        return out


class Echo:
    name, description = "search", "echo"

    def __call__(self, args):
        return f"found {args}"


def env(**tools):
    return ToolEnvironment(tools or {"search": Echo()}, TagFormat(), TOK, timeout_s=2.0, max_chars=40)


def test_two_turn_episode_token_in_token_out_and_masks():
    script = {"Q1": ["<call>search: ab</call>", "<answer>x</answer><|endoftext|>"]}
    backend = Scripted(script)
    e = env()
    req = [RolloutRequest(ids("Q1"), 1)]
    (ep,) = run_episodes(backend, req, e, [None], SamplingParams(64), None, TurnLimits(3, 0, 64), TOK)
    turn1, obs, turn2 = ids("<call>search: ab</call>"), ids("<result>found ab</result>"), ids("<answer>x</answer>")
    assert ep.response_ids == turn1 + obs + turn2 + [TOK.eos_token_id]
    assert ep.loss_mask == [1] * len(turn1) + [0] * len(obs) + [1] * (len(turn2) + 1)
    assert ep.logprobs == [-0.5] * len(turn1) + [0.0] * len(obs) + [-0.5] * (len(turn2) + 1)
    assert ep.finish_reason == "stop" and ep.turns == 2 and not ep.truncated_turn
    assert model_text(ep.record()) == "<call>search: ab</call><answer>x</answer>"
    assert ep.state["calls"] == {"search": 1} and ep.state["well_formed"] == [1]
    # the second turn continued from the token ids (prompt + turn 1 + result), not re-tokenised text
    second_req = backend.calls[1][0][0]
    assert second_req.prompt_ids == ids("Q1") + turn1 + obs
    # every turn may stop at the call tag
    assert backend.calls[0][1].stop_ids == (TOK.convert_tokens_to_ids("</call>"),)


def test_observation_mask_matches_the_rollout_mask():
    """SFT masks a demonstration's tool result exactly as the rollout does."""
    demo = ids("<call>search: ab</call><result>found ab</result><answer>x</answer>")
    open_id, close_id = TOK.convert_tokens_to_ids("<result>"), TOK.convert_tokens_to_ids("</result>")
    mask = observation_mask(demo, open_id, close_id)
    n1, n_obs = len(ids("<call>search: ab</call>")), len(ids("<result>found ab</result>"))
    assert mask == [1] * n1 + [0] * n_obs + [1] * (len(demo) - n1 - n_obs)


def test_budgets_turn_cap_total_cap_and_turn_limit():
    long_turn = {"Q": ["<call>search: abcdefghijklmnop</call>", "<answer>x</answer><|endoftext|>"]}
    # per-turn cap: the first turn is cut -> the episode ends, counted as a truncated turn
    (ep,) = run_episodes(Scripted(long_turn), [RolloutRequest(ids("Q"), 1)], env(), [None], SamplingParams(64), None,
                         TurnLimits(3, 8, 64), TOK)
    assert len(ep.response_ids) == 8 and ep.finish_reason == "length" and ep.truncated_turn and ep.turns == 1
    # total cap: the tool result does not fit -> cut, the episode ends as truncated (not a truncated turn)
    short = {"Q": ["<call>search: ab</call>", "<answer>x</answer><|endoftext|>"]}
    n1 = len(ids("<call>search: ab</call>"))
    (ep,) = run_episodes(Scripted(short), [RolloutRequest(ids("Q"), 1)], env(), [None], SamplingParams(n1 + 4), None,
                         TurnLimits(3, 0, n1 + 4), TOK)
    assert len(ep.response_ids) == n1 + 3 and ep.finish_reason == "length" and ep.loss_mask[n1:] == [0, 0, 0]
    # turn limit: a call at the last allowed turn ends the episode without running the tool
    loop = {"Q": ["<call>search: a</call>"] * 5}
    (ep,) = run_episodes(Scripted(loop), [RolloutRequest(ids("Q"), 1)], env(), [None], SamplingParams(200), None,
                         TurnLimits(2, 0, 200), TOK)
    assert ep.turns == 2 and ep.turn_limit and ep.finish_reason == "length" and ep.state["calls"] == {"search": 1}
    m = episode_metrics([ep.record()])
    assert m["agent/turn_limit"] == 1.0 and m["agent/tool_calls/search"] == 1.0 and m["agent/turns"] == 2.0


def test_rows_in_different_turns_share_one_call():
    scripts = {"A": ["<answer>1</answer><|endoftext|>"],
               "B": ["<call>search: b</call>", "<call>search: c</call>", "<answer>2</answer><|endoftext|>"]}
    backend = Scripted(scripts)
    eps = run_episodes(backend, [RolloutRequest(ids("A"), 2), RolloutRequest(ids("B"), 1)], env(), [None, None],
                       SamplingParams(100), None, TurnLimits(4, 0, 100), TOK)
    assert [e.turns for e in eps] == [1, 1, 3]
    assert [len(reqs) for reqs, _ in backend.calls] == [2, 1, 1]  # first call: the requests as given (n=2, n=1)


def test_hanging_raising_and_flooding_tools_give_error_results():
    class Hang:
        name, description = "hang", ""

        def __call__(self, args):
            time.sleep(30)

    class Boom:
        name, description = "boom", ""

        def __call__(self, args):
            raise RuntimeError("kaput")

    class Flood:
        name, description = "flood", ""

        def __call__(self, args):
            return "x" * (10 << 20)

    e = ToolEnvironment({"hang": Hang(), "boom": Boom(), "flood": Flood()}, TagFormat(), TOK, timeout_s=0.5,
                        max_chars=30)
    outs = {}
    for name in ("hang", "boom", "flood", "nosuch"):
        state = e.reset(None)
        outs[name] = (e.step(state, f"<call>{name}: q</call>"), state)
    assert "timed out" in outs["hang"][0] and outs["hang"][1]["errors"] == 1  # returned before the tool did
    assert "RuntimeError: kaput" in outs["boom"][0] and outs["boom"][1]["errors"] == 1
    assert len(outs["flood"][0]) < 100 and outs["flood"][1]["truncated_results"] == 1 and outs["flood"][1]["errors"] == 0
    assert "unknown tool" in outs["nosuch"][0] and outs["nosuch"][1]["well_formed"] == [0]
    state = e.reset(None)
    assert "malformed" in e.step(state, "<call></call>") and state["errors"] == 1
    assert e.step(state, "<answer>1</answer>") is None  # a final turn


def test_no_tools_is_the_single_turn_generate_call_exactly():
    """Single-turn tasks run through the same loop: one generate call, same ids, same draws."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from longrl.rollout.hf import HFBackend

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(TOK), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=TOK.pad_token_id,
                                         eos_token_id=TOK.eos_token_id))
    backend = HFBackend(model, eos_id=TOK.eos_token_id, pad_id=TOK.pad_token_id)
    reqs = [RolloutRequest(ids("12+3="), 3), RolloutRequest(ids("7+88="), 2)]
    sampling = SamplingParams(12, temperature=1.0)
    direct = backend.generate(reqs, sampling, torch.Generator().manual_seed(5))
    eps = run_episodes(backend, reqs, NoTools(), [None, None], sampling, torch.Generator().manual_seed(5),
                       TurnLimits(1, 0, 12), TOK)
    assert [e.response_ids for e in eps] == [g.response_ids for g in direct]
    assert [e.logprobs for e in eps] == [g.logprobs for g in direct]
    assert [e.finish_reason for e in eps] == [g.finish_reason for g in direct]
    assert all(e.loss_mask == [1] * len(e.response_ids) for e in eps)


def test_stop_ids_end_rows_on_the_hf_and_continuous_engines():
    """A tool call's closing id ends a row like EOS on the native engines (kept as the last
    id); before it the row is what it would have been without the stop id."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from longrl.rollout.continuous import ContinuousBackend
    from longrl.rollout.hf import HFBackend

    torch.manual_seed(1)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(TOK), hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=TOK.pad_token_id,
                                         eos_token_id=TOK.eos_token_id))
    reqs = [RolloutRequest(ids("ab"), 4)]
    for backend in (HFBackend(model, eos_id=TOK.eos_token_id, pad_id=TOK.pad_token_id),
                    ContinuousBackend(model, 4, eos_token_id=TOK.eos_token_id, pad_token_id=TOK.pad_token_id)):
        free = backend.generate(reqs, SamplingParams(20), torch.Generator().manual_seed(0))
        stop = free[0].response_ids[3]  # a token row 0 samples: make it the stop id
        gens = backend.generate(reqs, SamplingParams(20, stop_ids=(stop,)), torch.Generator().manual_seed(0))
        assert gens[0].finish_reason == "stop" and len(gens[0].response_ids) <= 4, backend.name
        for g, f in zip(gens, free):
            if stop in f.response_ids:
                n = f.response_ids.index(stop) + 1
                assert g.response_ids == f.response_ids[:n] and g.finish_reason == "stop", backend.name
            else:
                assert g.response_ids == f.response_ids, backend.name


def test_pick_format():
    assert pick_format("auto", TOK).name == "tags"
    import pytest

    from longrl.errors import UserError

    with pytest.raises(UserError, match="single token"):
        pick_format("tags", build_tiny_tokenizer())  # no tool tags in this vocabulary
    with pytest.raises(UserError, match="single token"):
        pick_format("hermes", TOK)


class ScriptedEngine:
    """APRIL's engine protocol over scripted turns: a request's next tokens continue the
    script turn its context is in (the number of tool results so far), one token per step,
    from where the context left off (so a parked request resumes mid-turn)."""

    def __init__(self, scripts, num_slots):
        self.scripts, self.num_slots = scripts, num_slots
        self.policy_version = self.steps = self.busy_slot_steps = self.tokens_generated = 0
        self._waiting, self._active = [], []

    @property
    def has_work(self):
        return bool(self._waiting or self._active)

    def submit(self, requests):
        self._waiting += list(requests)

    def _plan(self, r):
        from longrl.rollout.continuous import Result

        context = TOK.decode(r.prompt_ids + r.resume_ids, skip_special_tokens=False)
        prompt = next(p for p in self.scripts if context.startswith(p))
        turn = context.count("</result>")
        text = self.scripts[prompt][turn]
        full = ids(text.removesuffix("<|endoftext|>")) + ([TOK.eos_token_id] if text.endswith("<|endoftext|>") else [])
        done = len(r.resume_ids) - (len(ids(context.rsplit("</result>", 1)[0] + "</result>")) - len(r.prompt_ids)
                                    if turn else 0)
        return [r, full[done:], Result(r.request_id, [], [], [], "")]

    def step(self):
        while self._waiting and len(self._active) < self.num_slots:
            self._active.append(self._plan(self._waiting.pop(0)))
        self.steps += 1
        self.busy_slot_steps += len(self._active)
        finished, keep = [], []
        for item in self._active:
            r, todo, res = item
            tok = todo.pop(0)
            res.token_ids.append(tok)
            res.logprobs.append(-0.25)
            res.versions.append(self.policy_version)
            self.tokens_generated += 1
            if tok == TOK.eos_token_id or tok in r.stop_ids:
                res.finish_reason = "stop"
                finished.append(res)
            elif len(res.token_ids) >= r.max_new_tokens:
                res.finish_reason = "length"
                finished.append(res)
            else:
                keep.append(item)
        self._active = keep
        return finished

    def abort_all(self):
        out = [res for _, _, res in self._active]
        for res in out:
            res.finish_reason = "abort"
        from longrl.rollout.continuous import Result

        out += [Result(r.request_id, [], [], [], "abort") for r in self._waiting]
        self._active, self._waiting = [], []
        return out


def test_april_runs_episodes_and_resumes_a_parked_one_mid_turn():
    """Over-provisioned groups: the quick group returns, the slow one is parked mid-episode
    and finishes next step with exactly the tokens of an uninterrupted episode."""
    from longrl.rollout.april import AprilScheduler
    from longrl.rollout.episodes import AprilEpisodes

    scripts = {"A": ["<call>search: a</call>", "<answer>1</answer><|endoftext|>"],
               "B": ["<call>search: bbbbbbbbbbbb</call>", "<answer>2222222</answer><|endoftext|>"]}
    expect = {}
    for p, (t1, t2) in scripts.items():
        q = t1[len("<call>search: "):-len("</call>")]
        expect[p] = (ids(t1) + ids(f"<result>found {q}</result>") + ids(t2.removesuffix("<|endoftext|>")) +
                     [TOK.eos_token_id], len(ids(t1)), len(ids(f"<result>found {q}</result>")))
    engine = ScriptedEngine(scripts, num_slots=4)
    sched = AprilScheduler(engine, group_size=2, over_provision=2.0, partial=True, max_new_tokens=80,
                           episodes=AprilEpisodes(env(), TurnLimits(3, 0, 80), TOK, lambda pid: None))
    prompts = iter([("A", ids("A")), ("B", ids("B"))])
    (group,), _ = sched.next_step(prompts, 1)
    assert [s.prompt_id for s in group] == ["A", "A"]
    parked = [s for g in sched.buffer for s in g.samples]
    assert parked and all(s.response_ids and not s.finished for s in parked)  # B parked mid-episode
    (group_b,), _ = sched.next_step(prompts, 1)
    for s in group + group_b:
        full, n1, n_obs = expect[s.prompt_id]
        assert s.response_ids == full and s.finish_reason == "stop"
        assert s.loss_mask == [1] * n1 + [0] * n_obs + [1] * (len(full) - n1 - n_obs)
        assert s.episode["turns"] == 2 and s.episode["env"]["calls"] == {"search": 1}
        assert [lp for lp, m in zip(s.logprobs, s.loss_mask) if m] == [-0.25] * (len(full) - n_obs)


def test_hermes_format_parses_qwen_tool_calls():
    from longrl.rollout.episodes import HermesFormat

    fmt = HermesFormat()
    assert fmt.parse('I will look.<tool_call>{"name": "search", "arguments": {"query": "Vokari color"}}</tool_call>') \
        == ("search", "Vokari color")
    assert fmt.parse('<tool_call>{"name": "python", "arguments": "print(1)"}</tool_call>') == ("python", "print(1)")
    assert fmt.parse("<tool_call>{not json}</tool_call>") is None
    assert fmt.parse('<tool_call>{"arguments": {}}</tool_call>') is None  # no name
    obs = fmt.observation("Vokari has color teal.")
    # the chat template's tool turn: the assistant turn closes, a user turn holds the response, the next opens
    assert obs.startswith("<|im_end|>\n<|im_start|>user\n<tool_response>\nVokari has color teal.\n</tool_response>")
    assert obs.endswith("<|im_start|>assistant\n")


def test_the_tools_of_one_turn_run_concurrently():
    """Four episodes call a tool in the same turn: the calls are in flight together (counted,
    not timed), so one hanging tool does not hold up the others' results."""
    import threading

    class Slow:
        name, description = "search", ""
        active = peak = 0
        lock = threading.Lock()

        def __call__(self, args):
            with self.lock:
                Slow.active += 1
                Slow.peak = max(Slow.peak, Slow.active)
            time.sleep(0.3)
            with self.lock:
                Slow.active -= 1
            return "done"

    script = {"Q": ["<call>search: x</call>", "<answer>1</answer><|endoftext|>"]}
    eps = run_episodes(Scripted(script), [RolloutRequest(ids("Q"), 4)], env(search=Slow()), [None], SamplingParams(64),
                       None, TurnLimits(3, 0, 64), TOK)
    assert all(e.turns == 2 and e.state["calls"] == {"search": 1} for e in eps)
    assert Slow.peak > 1
