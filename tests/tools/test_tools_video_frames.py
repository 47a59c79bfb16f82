"""The `video_frames` tool end to end on the tiny VLM: a scripted call's observation (its
video tokens), the loss mask, the next turn's generation (== a one-shot greedy decode of the
whole context by the model's own forward with pixels for both videos), the behaviour
log-probs (== the trainer's), one encode per segment per step, the recipe's rollout rows,
and every bad call an error result (counted), never a crash."""

from dataclasses import replace

import pytest
import torch

pytest.importorskip("av", reason="video tests need PyAV (pip install -e '.[video]')")

from longrl.config import load_config  # noqa: E402
from longrl.data import video_task as V  # noqa: E402
from longrl.errors import UserError  # noqa: E402
from longrl.media.segments import decode_segment  # noqa: E402
from longrl.models.tiny import TOOL_TOKENS  # noqa: E402
from longrl.models.vlm import VIDEO_PAD, VISION_END, VISION_START, patchify, seconds_per_grid  # noqa: E402
from longrl.policy.video import VideoPolicy, load_video_policy  # noqa: E402
from longrl.rewards.verifiers import answer_scorer  # noqa: E402
from longrl.rollout.base import SamplingParams  # noqa: E402
from longrl.rollout.engine import Generation  # noqa: E402
from longrl.rollout.episodes import (Observation, ToolEnvironment, TurnLimits, episode_example,  # noqa: E402
                                     episode_metrics, place_media, run_episodes, TagFormat)
from longrl.rollout.hf import HFBackend  # noqa: E402
from longrl.streambp.logprobs import make_batch  # noqa: E402
from longrl.tools import make_tools  # noqa: E402
from longrl.tools.video_frames import parse_range, video_tokens  # noqa: E402

TINY = [
    "task.name=videos", "task.n_train=2", "task.n_eval=1", "task.kwargs.kinds=colour", "task.kwargs.fps=4",
    "task.kwargs.min_seconds=4", "task.kwargs.max_seconds=5",
    "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.intermediate_size=64",
    "video.max_frames=4", "video.max_pixels=3136", "run.progress=false",
    "tools.enabled=video_frames", "rollout.max_turns=2", "rollout.max_new_tokens=64", "rollout.temperature=0",
    "rl.group_size=2", "rl.prompts_per_step=1",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vtool") / "videos"
    V.load_video_task(load_config(None, [*TINY, f"task.train_file={d}/train.jsonl"]), answer_scorer("mcq"))
    return d


def setup(data_dir, *extra):
    from longrl.recipes.tasks import with_environment

    cfg = load_config(None, [*TINY, f"task.train_file={data_dir}/train.jsonl", *extra])
    task = V.load_video_task(cfg, answer_scorer("mcq"))
    torch.manual_seed(0)
    model, tok = load_video_policy(cfg.model, torch.device("cpu"), extra_tokens=tuple(TOOL_TOKENS))
    model = model.double()
    task = with_environment(task, cfg, tok)
    return cfg, VideoPolicy(model, tok, task, cfg), task, tok


class Scripted:
    """The backend whose first turn is a scripted tool call; later turns are the real engine's."""

    def __init__(self, inner, script: list[int]):
        self.inner, self.script, self.calls = inner, script, 0

    def generate(self, requests, sampling, generator=None):
        self.calls += 1
        if self.calls == 1:
            return [Generation(list(self.script), [-0.5] * len(self.script), "stop") for r in requests for _ in range(r.n)]
        return self.inner.generate(requests, sampling, generator)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def greedy_reference(model, task, tok, context, videos, n):
    """Greedy decode by the model's own forward, no cache: pixels of every video in, the whole
    context re-run for every token."""
    pvs, grids, spgs = [], [], []
    for c in videos:
        pv, grid = patchify(c.frames)
        pvs.append(pv.double())
        grids.append(grid)
        spgs.append(c.second_per_grid if hasattr(c, "second_per_grid") else seconds_per_grid(c.timestamps))
    seq = list(context)
    out = []
    with torch.no_grad():
        for _ in range(n):
            x = torch.tensor([seq])
            logits = model(input_ids=x, pixel_values_videos=torch.cat(pvs), video_grid_thw=torch.stack(grids),
                           mm_token_type_ids=(x == model.config.video_token_id).int() * 2,
                           second_per_grid_ts=torch.tensor(spgs), use_cache=False).logits[0, -1]
            t = int(logits.argmax())
            out.append(t)
            seq.append(t)
            if t == tok.eos_token_id:
                break
    return out


def test_a_scripted_call_splices_the_segment_and_the_next_turn_sees_it(data_dir):
    cfg, policy, task, tok = setup(data_dir)
    ex = task.train[0]
    call = ids(tok, "<call>video_frames: 1, 3</call>")
    backend = Scripted(HFBackend(policy.model, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id), call)
    limits = TurnLimits(max_turns=2, total_tokens=64)
    policy.start_step(0)
    before = dict(policy.totals)
    eps = run_episodes(backend, policy.requests([ex], 2), task.environment, [ex], SamplingParams(64, temperature=0.0),
                       None, limits, tok)
    assert len(eps) == 2 and backend.calls == 2
    ep = eps[0]
    # The observation: the tool's caption and a video mark of the segment's tokens (8 frames
    # at 4 fps -> 4 temporal steps x 4 merged patches = 16), tokenised once.
    spec = ep.media[0][0]
    n = video_tokens(tuple(decode_segment(spec).frames.shape))
    assert n == 16
    obs = ids(tok, f"<result>frames 1-3 s: {VISION_START}{VIDEO_PAD * n}{VISION_END}</result>")
    assert ep.response_ids[: len(call)] == call and ep.response_ids[len(call) : len(call) + len(obs)] == obs
    assert ep.media == [(spec, len(call) + obs.index(policy.model.config.video_token_id))]
    # The mask: the model's call and its next turn are trained, the tool's result is not.
    rest = len(ep.response_ids) - len(call) - len(obs)
    assert rest > 0 and ep.loss_mask == [1] * len(call) + [0] * len(obs) + [1] * rest
    # The next turn == a one-shot greedy decode of prompt + call + observation by the model's
    # own forward with the pixels of both videos.
    prompt = policy.encode_prompts([ex])[0]
    context = prompt + call + obs
    ref = greedy_reference(policy.model, task, tok, context, [task.clips[ex.media[0]], decode_segment(spec)], rest)
    assert ep.response_ids[len(call) + len(obs) :] == ref
    # Two encodes: the prompt's video and the segment (both samples asked for it), once each.
    assert policy.totals["encodes"] - before["encodes"] == 2
    # The behaviour log-probs of the next turn == the trainer's on the recipe's row.
    row = episode_example(ex, ep.media)
    batch = make_batch([prompt], [ep.response_ids], tok.pad_token_id)
    lp = policy.logprobs(batch, [row], temperature=1.0)[0]  # [T]
    model_tail = [i for i, m in enumerate(ep.loss_mask) if m][len(call) :]  # the engine's own tokens
    got = torch.tensor([ep.logprobs[i] for i in model_tail], dtype=torch.float64)
    torch.testing.assert_close(lp[[len(prompt) - 1 + i for i in model_tail]], got, atol=1e-9, rtol=0)
    assert policy.totals["encodes"] - before["encodes"] == 2  # the pass reused the step's encodes


def test_the_recipes_rollout_rows_carry_the_segments(data_dir):
    """grpo.rollout with a scripted call: each row's example holds its segment, and the
    trainer's log-probs of the engine's tokens equal the behaviour log-probs."""
    from longrl.recipes.grpo import rollout

    cfg, policy, task, tok = setup(data_dir)
    call = ids(tok, "<call>video_frames: 0.5, 2</call>")
    backend = Scripted(HFBackend(policy.model, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id), call)
    roll = rollout(policy, backend, task.train[:1], task, cfg, torch.Generator().manual_seed(0), version=0)
    at = len(call) + len(ids(tok, "<result>frames 0.5-2 s: " + VISION_START))  # the segment's first token
    assert len(roll.examples) == 2 and all(len(e.media) == 2 and e.meta["media_offsets"] == [at] for e in roll.examples)
    assert float(roll.agent["agent/tool_calls/video_frames"].mean()) == 1.0
    batch = make_batch(roll.prompt_ids, roll.response_ids, tok.pad_token_id)
    lp = policy.logprobs(batch, roll.examples, temperature=1.0)
    for i, (mask, beh) in enumerate(zip(roll.loss_masks, roll.behaviour_logprobs)):
        tail = [j for j, m in enumerate(mask) if m][len(call) :]
        P = len(roll.prompt_ids[i])
        torch.testing.assert_close(lp[i, [P - 1 + j for j in tail]], torch.tensor([beh[j] for j in tail],
                                                                                 dtype=torch.float64), atol=1e-9, rtol=0)


@pytest.mark.parametrize("args, message", [
    ("soon", "takes start and end"), ("3, 1", "must come after"), ("2, 2", "must come after"),
    ("1, 2, 3", "takes start and end"), ("-1, 2", ">= 0"), ("40, 42", "outside the video"),
    ('{"start": 1}', "takes start and end"), ('{"start": "a", "end": 2}', "takes start and end"),
])
def test_bad_calls_are_error_results_counted_not_crashes(data_dir, args, message):
    _, policy, task, tok = setup(data_dir)
    env = task.environment
    state = env.reset(task.train[0])
    obs = env.step(state, f"<call>video_frames: {args}</call>")
    assert isinstance(obs, str) and obs.startswith("<result>error: ") and message in obs
    assert state["errors"] == 1 and state["calls"] == {"video_frames": 1}
    record = {"env": state, "turns": 2, "turn_texts": [], "truncated_turn": False, "turn_limit": False}
    assert episode_metrics([record], ("video_frames",))["agent/tool_errors"] == 1.0


def test_parse_range_reads_the_forms_a_model_writes():
    assert parse_range("3, 5") == (3.0, 5.0) == parse_range("3-5") == parse_range("from 3 to 5")
    assert parse_range('{"start": 1.5, "end": 2}') == (1.5, 2.0)
    from longrl.rollout.episodes import HermesFormat

    name, args = HermesFormat().parse('<tool_call>{"name": "video_frames", "arguments": {"start": 1, "end": 2}}</tool_call>')
    assert name == "video_frames" and parse_range(args) == (1.0, 2.0)


def test_a_result_cut_by_the_budget_drops_a_segment_it_holds_in_part():
    obs = Observation("x", ("seg-a", "seg-b"), media_token=9)
    ids = [1, 9, 9, 9, 2, 3, 9, 9, 4]
    assert place_media(ids, obs, cut=False) == (ids, [("seg-a", 1), ("seg-b", 6)])
    assert place_media(ids[:8], obs, cut=True) == (ids[:6], [("seg-a", 1)])  # seg-b's run reaches the cut
    assert place_media(ids[:3], obs, cut=True) == ([1], [])


def test_an_episode_whose_result_does_not_fit_keeps_no_partial_video(data_dir):
    _, policy, task, tok = setup(data_dir)
    ex = task.train[0]
    call = ids(tok, "<call>video_frames: 1, 3</call>")
    backend = Scripted(HFBackend(policy.model, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id), call)
    policy.start_step(0)
    (ep,) = run_episodes(backend, policy.requests([ex], 1), task.environment, [ex], SamplingParams(30, temperature=0.0),
                         None, TurnLimits(max_turns=2, total_tokens=30), tok)
    assert ep.finish_reason == "length" and ep.media == [] and backend.calls == 1
    assert policy.model.config.video_token_id not in ep.response_ids
    assert len(ep.response_ids) <= 30 and ep.loss_mask == [1] * len(call) + [0] * (len(ep.response_ids) - len(call))


def test_config_refuses_what_video_frames_does_not_support(data_dir):
    base = [f"task.train_file={data_dir}/train.jsonl"]
    with pytest.raises(UserError, match="needs a video task"):
        load_config(None, ["tools.enabled=video_frames", "rollout.max_turns=2"])
    for bad, match in [("video.token_reduction=diff", "token_reduction"), ("tools.video_fps=0", "video_fps"),
                       ("tools.video_max_frames=0", "video_max_frames")]:
        with pytest.raises(UserError, match=match):
            load_config(None, [*TINY, *base, bad])
    with pytest.raises(UserError, match="no videos"):
        make_tools(["video_frames"])


def test_the_tool_needs_no_grad_thread_and_uses_the_tasks_frame_size(data_dir):
    _, _, task, _ = setup(data_dir)
    tool = task.environment.tools["video_frames"]
    out = tool.with_media(task.train[0].media)("1, 3")
    clip = decode_segment(out.media[0])
    assert clip.frames.shape[1:3] == task.clips[task.train[0].media[0]].frames.shape[1:3]
    assert tool.sampling.fps == 4.0 and tool.sampling.max_frames == 8
    assert isinstance(task.environment, ToolEnvironment) and isinstance(task.environment.fmt, TagFormat)
    assert replace(tool.sampling, fps=1.0) != tool.sampling


def test_longrl_train_runs_video_episodes_end_to_end(tmp_path, data_dir):
    """`longrl train` with the tool offered: SFT, GRPO episodes and held-out episodes run and
    log the agent metrics (an untrained model seldom calls the tool: this is the wiring)."""
    import json

    from longrl.cli import main

    args = [a for a in TINY if not a.startswith(("rl.", "rollout.temperature"))]
    assert main(["train", *args, f"task.train_file={data_dir}/train.jsonl", f"run.out_dir={tmp_path}", "run.name=a",
                 "sft.steps=1", "sft.batch_size=2", "sft.warmup_steps=1", "rl.steps=1", "rl.prompts_per_step=2",
                 "rl.group_size=2", "rl.kl_coef=0.05", "rl.eval_every=1", "eval.max_new_tokens=64"]) == 0
    recs = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    step = [r for r in recs if r["phase"] == "rl" and r["step"] == 1][0]
    assert "agent/tool_calls/video_frames" in step and "eval/tool_calls/video_frames" in step


def test_the_example_config_offers_the_tool_on_videos():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parents[2] / "examples" / "video_agent.yaml")
    assert cfg.tools.enabled == ["video_frames"] and cfg.task.name == V.TASK_NAME and cfg.rollout.max_turns == 2
    V.check_config(cfg)


def test_a_tool_calling_demonstration_trains_on_its_segment(tmp_path):
    """examples/video_flash.py's teacher calls video_frames and holds the result verbatim;
    SFT's row for it splices the segment at the result's video tokens (the answer's log-prob
    is not the one the bare pad tokens give)."""
    import importlib.util
    from pathlib import Path

    from longrl.rollout.episodes import demonstration_example

    spec = importlib.util.spec_from_file_location("video_flash", Path(__file__).resolve().parents[2] / "examples"
                                                  / "video_flash.py")
    flash = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(flash)
    flash.generate(tmp_path / "d", 2, 1, skip=0.0)
    cfg = load_config(Path(__file__).resolve().parents[2] / "examples" / "video_agent_flash.yaml",
                      [f"task.train_file={tmp_path}/d/train.jsonl", f"task.eval_file={tmp_path}/d/eval.jsonl",
                       "task.n_train=2", "task.n_eval=1", "model.tiny.hidden_size=32", "model.tiny.num_layers=1"])
    task = V.load_video_task(cfg, answer_scorer("mcq"))
    torch.manual_seed(0)
    model, tok = load_video_policy(cfg.model, torch.device("cpu"), extra_tokens=tuple(TOOL_TOKENS))
    policy = VideoPolicy(model.double(), tok, task, cfg)
    ex = task.train[0]
    resp = ids(tok, ex.solution) + [tok.eos_token_id]
    row = demonstration_example(ex, resp, tok)
    pad = model.config.video_token_id
    assert row.media == [ex.media[0], *ex.meta["demo_media"]] and row.meta["media_offsets"] == [resp.index(pad)]
    prompt = policy.encode_prompts([ex])[0]
    batch = make_batch([prompt], [resp], tok.pad_token_id)
    policy.start_step(0)
    spliced, bare = (policy.logprobs(batch, [e], temperature=1.0)[0, -3] for e in (row, ex))
    assert not torch.isclose(spliced, bare)
    plain = replace(ex, meta={})
    assert demonstration_example(plain, resp, tok) is plain  # no media named: the example as it is
