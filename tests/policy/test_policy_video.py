"""The video policy and task: `longrl train` on generated videos end to end, cached ==
uncached log-probs of the recipe's rollouts, StreamBP == chunked updates, bad video data,
and the example config."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("av", reason="video tests need PyAV (pip install -e '.[video]')")

from longrl.cli import main  # noqa: E402
from longrl.config import load_config  # noqa: E402
from longrl.errors import UserError  # noqa: E402
from longrl.data import video_task as V  # noqa: E402
from longrl.policy.video import VideoPolicy, load_video_policy  # noqa: E402
from longrl.rewards.verifiers import answer_scorer  # noqa: E402


def load_task(cfg):
    return V.load_video_task(cfg, answer_scorer("mcq"))

TINY = [
    "task.name=videos", "task.n_train=6", "task.n_eval=2", "task.kwargs.kinds=colour",
    "task.kwargs.min_seconds=3", "task.kwargs.max_seconds=5",
    "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.intermediate_size=64",
    "video.max_frames=4", "video.max_pixels=3136",
    "sft.steps=2", "sft.batch_size=3", "sft.warmup_steps=1",
    "rl.steps=2", "rl.prompts_per_step=2", "rl.group_size=2", "rl.micro_batch_size=3", "rl.eval_every=1",
    "rollout.max_new_tokens=6", "eval.max_new_tokens=6", "run.progress=false",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Six training and two held-out videos, generated the way a fresh clone's run does."""
    d = tmp_path_factory.mktemp("vdata") / "videos"
    cfg = load_config(None, [*TINY, f"task.train_file={d}/train.jsonl"])
    load_task(cfg)  # the directory does not exist: generated here
    assert (d / "train.jsonl").is_file() and (d / "eval.jsonl").is_file()
    return d


def test_video_train_end_to_end_writes_summary_and_counts_saved_encodes(tmp_path, data_dir):
    # A KL term: every RL step updates (this untrained model's rewards are all 0, and a step
    # without signal would make no update and run no training pass).
    assert main(["train", *TINY, f"task.train_file={data_dir}/train.jsonl", f"run.out_dir={tmp_path}",
                 "run.name=v", "rl.kl_coef=0.05"]) == 0
    run = tmp_path / "v"
    summary = json.loads((run / "summary.json").read_text())
    for k in ("accuracy_after_sft", "accuracy_after_rl", "wall_seconds"):
        assert k in summary
    # Frozen tower: each of the 8 videos is encoded once in the whole run (eval encodes are
    # not counted); a pixel pipeline would encode G per rollout and once per sequence per
    # pass: 2 SFT steps x 3 + 2 RL steps x 2 prompts x 2 samples x (rollout, reference, update;
    # on-policy the old log-probs are the update's own, `grpo.on_policy_update`).
    assert summary["video_encodes"] <= 6
    assert summary["video_encodes"] + summary["video_encodes_saved"] == 2 * 3 + 2 * 2 * 2 * 3
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in recs if r["phase"] == "rl" and r["step"] > 0]
    assert [r["video/encodes_saved"] for r in rl] == [12, 12] and all(r["video/encodes"] == 0 for r in rl)
    assert all(r["logprob/engine_trainer_gap"] < 1e-4 for r in rl)  # rollout log-probs == trainer's
    assert (run / "checkpoints" / "step_2" / "model.safetensors").is_file()


def test_cached_and_uncached_logprobs_agree_for_a_rollout_batch(data_dir):
    from longrl.models.vlm import patchify
    from longrl.streambp.logprobs import make_batch

    cfg = load_config(None, [*TINY, f"task.train_file={data_dir}/train.jsonl"])
    task = load_task(cfg)
    torch.manual_seed(0)
    model, tok = load_video_policy(cfg.model, torch.device("cpu"))
    model = model.double()  # float64: the two paths agree to ~1e-12
    from longrl.recipes.grpo import rollout
    from longrl.rollout.hf import HFBackend

    cfg.train.stream_chunk = 4
    policy = VideoPolicy(model, tok, task, cfg)
    examples = task.train[:2]
    backend = HFBackend(model, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    roll = rollout(policy, backend, examples, task, cfg, torch.Generator().manual_seed(0), version=0)
    batch = make_batch(roll.prompt_ids, roll.response_ids, tok.pad_token_id)
    cached = policy.logprobs(batch, roll.examples, temperature=1.0)  # [B, T]

    # Uncached: the model's own forward, pixels in, the vision tower run for every row. It
    # takes every video pad token for video, so rows whose sampled response holds one (a
    # random policy can sample it; the recipe treats it as text) cannot be compared.
    pad = model.config.video_token_id
    keep = [i for i, r in enumerate(roll.response_ids) if pad not in r]
    assert len(keep) >= 2
    rows = []
    for i in keep:
        ex = roll.examples[i]
        clip = task.clips[ex.media[0]]
        pv, grid = patchify(clip.frames)
        ids = batch.input_ids[i : i + 1]
        with torch.no_grad():
            logits = model(input_ids=ids, pixel_values_videos=pv.double(), video_grid_thw=grid.view(1, 3),
                           mm_token_type_ids=(ids == model.config.video_token_id).int() * 2,
                           second_per_grid_ts=torch.tensor([clip.second_per_grid]), use_cache=False).logits
        rows.append(torch.log_softmax(logits[0], -1).gather(-1, batch.targets[i, :, None]).squeeze(-1))
    uncached = torch.stack(rows) * batch.mask[keep]  # [B', T]
    torch.testing.assert_close(cached[keep], uncached, atol=1e-9, rtol=0)
    for i, lp in enumerate(roll.behaviour_logprobs):  # and the rollouts' own log-probs
        torch.testing.assert_close(cached[i][batch.mask[i] > 0], torch.tensor(lp, dtype=torch.float64),
                                   atol=1e-9, rtol=0)


@pytest.mark.parametrize("train_vision", [False, True])
@pytest.mark.parametrize("rows, tol", [((0, 1, 2), 1e-9), ((0, 0, 1), 1e-7)], ids=["own-prompts", "shared-prompt"])
def test_streambp_update_equals_the_chunked_one(data_dir, train_vision, rows, tol):
    """One micro-batch of three rows (uneven lengths): StreamBP's layer-chunked backward on
    whole rows gives the chunked path's loss, log-probs and every gradient, the vision
    tower's included when it trains. Where two rows share a prompt the chunked path runs it
    once and sums the two rows' gradients before the RMSNorm's float32 backward, StreamBP
    after it: the same math, rounded differently (~3e-8 relative in float64)."""
    from longrl.streambp.logprobs import make_batch

    results = {}
    for mode in ("chunked", "streambp"):
        cfg = load_config(None, [*TINY, f"task.train_file={data_dir}/train.jsonl", f"train.backprop={mode}",
                                 f"video.train_vision={str(train_vision).lower()}", "train.stream_chunk=5"])
        task = load_task(cfg)
        torch.manual_seed(0)
        model, tok = load_video_policy(cfg.model, torch.device("cpu"), train_vision=train_vision)
        model = model.double()
        policy = VideoPolicy(model, tok, task, cfg)
        policy.start_step()
        examples = [task.train[i] for i in rows]
        prompts = policy.encode_prompts(examples)
        responses = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]
        batch = make_batch(prompts, responses, tok.pad_token_id)
        weights = torch.linspace(0.5, 1.5, batch.input_ids.shape[1], dtype=torch.float64)

        def loss_fn(logp):
            return -(logp * weights).sum() + 0.1 * (logp.sum(-1) ** 2).sum()

        model.zero_grad()
        loss, _, logp = policy.loss_and_backward(batch, examples, loss_fn)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[mode] = (loss, logp, grads)
    (l_a, lp_a, g_a), (l_b, lp_b, g_b) = results["chunked"], results["streambp"]
    torch.testing.assert_close(l_b, l_a, atol=1e-10, rtol=0)
    torch.testing.assert_close(lp_b, lp_a, atol=1e-10, rtol=0)
    assert g_a.keys() == g_b.keys() and any("visual" in n for n in g_a) == train_vision
    for name in g_a:
        err = float((g_b[name] - g_a[name]).abs().max()) / max(float(g_a[name].abs().max()), 1e-6)
        assert err < tol, (name, err)  # relative to the gradient's largest entry (float64)


def test_video_train_runs_with_streambp(tmp_path, data_dir):
    assert main(["train", *TINY, f"task.train_file={data_dir}/train.jsonl", f"run.out_dir={tmp_path}",
                 "run.name=s", "train.backprop=streambp", "train.stream_chunk=8", "rl.kl_coef=0.05"]) == 0
    recs = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in recs if r["phase"] == "rl" and r["step"] > 0]
    assert len(rl) == 2 and all(r["logprob/engine_trainer_gap"] < 1e-4 for r in rl)


def _write_jsonl(path: Path, media: list[str]) -> None:
    lines = [json.dumps({"id": f"q{i}", "prompt": "What colour?\nA. red\nB. blue", "answer": "A", "media": [m]})
             for i, m in enumerate(media)]
    path.write_text("\n".join(lines) + "\n")


def test_bad_video_data_is_one_clear_error_and_writes_nothing(tmp_path, data_dir, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.mp4").write_bytes(b"not a video at all")
    (bad / "empty.webm").write_bytes(b"")
    _write_jsonl(bad / "train.jsonl", ["broken.mp4", "empty.webm"])
    _write_jsonl(bad / "eval.jsonl", [str(next((data_dir / "videos").iterdir()))])
    out = tmp_path / "runs"
    assert main(["train", *TINY, f"task.train_file={bad}/train.jsonl", f"run.out_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no train example has a readable video" in err[0] and "broken.mp4" in err[0]
    assert not out.exists()
    _write_jsonl(bad / "train.jsonl", ["missing.mp4"])  # a missing file: the JSONL reader names it
    assert main(["train", *TINY, f"task.train_file={bad}/train.jsonl", f"run.out_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.jsonl:1" in err[0] and "missing.mp4" in err[0]
    assert not out.exists()


def test_one_bad_video_is_skipped_with_a_count(tmp_path, data_dir, caplog):
    good = sorted(str(p) for p in (data_dir / "videos").iterdir())
    d = tmp_path / "mixed"
    d.mkdir()
    (d / "broken.mp4").write_bytes(b"\x00" * 100)
    _write_jsonl(d / "train.jsonl", [good[0], "broken.mp4", good[1]])
    _write_jsonl(d / "eval.jsonl", [good[2]])
    cfg = load_config(None, [*TINY, f"task.train_file={d}/train.jsonl"])
    with caplog.at_level("WARNING"):
        task = load_task(cfg)
    assert [ex.id for ex in task.train] == ["q0", "q2"]
    assert "skipped 1 of 3 train examples" in caplog.text


@pytest.mark.parametrize("override, message", [
    ("rollout.partial=true", "APRIL"),
    ("train.backprop=checkpoint", "chunked or streambp"),
    ("task.kwargs.colours=3", "task.kwargs.colours"),
])
def test_unsupported_video_settings_are_refused(override, message, data_dir):
    cfg = load_config(None, [*TINY, f"task.train_file={data_dir}/train.jsonl", override])
    with pytest.raises(UserError, match=message):
        load_task(cfg)


def test_existing_directory_without_the_jsonl_is_not_overwritten(tmp_path):
    (tmp_path / "mine").mkdir()
    cfg = load_config(None, [*TINY, f"task.train_file={tmp_path}/mine/train.jsonl"])
    with pytest.raises(UserError, match="does not exist"):
        load_task(cfg)
    assert list((tmp_path / "mine").iterdir()) == []


def test_example_config_parses_and_passes_the_video_checks():
    path = Path(__file__).resolve().parents[2] / "examples" / "video_grpo.yaml"
    cfg = load_config(path)
    assert cfg.task.name == V.TASK_NAME and cfg.video.max_frames == 8 and not cfg.video.train_vision
    V.check_config(cfg)


def test_resumed_video_run_continues_exactly(tmp_path, data_dir):
    import yaml

    common = [*TINY, f"task.train_file={data_dir}/train.jsonl", f"run.out_dir={tmp_path}", "rl.eval_every=0",
              "run.save_every=2"]
    assert main(["train", *common, "rl.steps=4", "run.name=full"]) == 0
    assert main(["train", *common, "rl.steps=2", "run.name=part"]) == 0
    cfg_path = tmp_path / "part" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["rl"]["steps"] = 4  # as if the run had stopped after its step-2 checkpoint
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["train", f"resume={tmp_path / 'part'}", "run.progress=false"]) == 0

    def rl(name):  # a resumed run re-encodes its videos (a new in-memory cache): video/* differ
        recs = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.startswith(("time/", "video/"))}
                for r in recs if r["phase"] == "rl" and r["step"] > 2]

    assert rl("part") == rl("full") and len(rl("full")) == 2


def _pixel_sequence_logp(model, task, ex, prompt, response):
    """Brute force: the model's own forward with the video's pixels, full logits. -> sum of the
    response tokens' log-probs (a scalar with grad)."""
    from longrl.models.vlm import patchify

    clip = task.clips[ex.media[0]]
    pv, grid = patchify(clip.frames)
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids, pixel_values_videos=pv.double(), video_grid_thw=grid.view(1, 3),
                   mm_token_type_ids=(ids == model.config.video_token_id).int() * 2,
                   second_per_grid_ts=torch.tensor([clip.second_per_grid]), use_cache=False).logits
    logp = torch.log_softmax(logits[0, :-1], -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return logp[len(prompt) - 1:].sum()


def test_video_dpo_step_gradient_equals_a_pixels_in_reference(data_dir, monkeypatch):
    """Online DPO on video through the same loop as text: one step's gradient (two pairs,
    micro-batches of one pair) equals brute-force DPO on the model's pixels-in forward."""
    import copy

    from longrl.recipes import dpo, grpo
    from longrl.rl.losses import dpo_loss

    cfg = load_config(None, [*TINY, f"task.train_file={data_dir}/train.jsonl", "rl.algorithm=dpo", "rl.dpo_beta=0.5",
                             "rl.micro_batch_size=2", "rl.group_size=2", "rl.prompts_per_step=2"])
    task = load_task(cfg)
    torch.manual_seed(0)
    model, tok = load_video_policy(cfg.model, torch.device("cpu"))
    model = model.double()
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    with torch.no_grad():  # the language model has moved away from the reference (the tower is frozen: shared)
        for name, p in model.named_parameters():
            if "visual" not in name:
                p.add_(0.01 * torch.randn_like(p))
    policy = VideoPolicy(model, tok, task, cfg)
    examples = [task.train[0], task.train[0], task.train[1], task.train[1]]  # 2 groups of 2
    prompts = policy.encode_prompts(examples)
    responses = [[10, 11, 12], [13, 14], [15, 16, 17, 18], [19]]
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    roll = grpo.Rollouts(examples, prompts, responses, [[0.0] * len(r) for r in responses],
                         [[0] * len(r) for r in responses], torch.zeros(4, dtype=torch.bool), rewards,
                         {"correctness": rewards})
    monkeypatch.setattr(dpo, "collect", lambda *a, **k: (roll, {}))
    grads = {}

    def capture(model, optimizer, scheduler, grad_clip, **kwargs):
        grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return 0.0

    monkeypatch.setattr(dpo, "clip_and_step", capture)
    state = grpo.init_state(model, cfg, n_train=len(task.train))
    state.reference = reference
    dpo.dpo_step(policy, None, task, cfg, state)

    model.zero_grad()
    pairs = dpo.pick_pairs(rewards, 2)
    assert pairs == [(0, 1), (3, 2)]
    seq = lambda m, i: _pixel_sequence_logp(m, task, examples[i], prompts[i], responses[i])  # noqa: E731
    chosen = torch.stack([seq(model, c) for c, _ in pairs])
    rejected = torch.stack([seq(model, r) for _, r in pairs])
    with torch.no_grad():
        ref_c = torch.stack([seq(reference, c) for c, _ in pairs])
        ref_r = torch.stack([seq(reference, r) for _, r in pairs])
    dpo_loss(chosen, rejected, ref_c, ref_r, 0.5, len(pairs))[0].backward()
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert want.keys() == grads.keys() and len(want) > 10
    for name in want:  # relative to the gradient's largest entry: rows sharing a prompt are summed
        # before Qwen2's float32 RMSNorm backward in the shared-prompt path (~5e-8, see above)
        err = float((grads[name] - want[name]).abs().max()) / max(float(want[name].abs().max()), 1e-6)
        assert err < 1e-7, (name, err)


def test_under_vllm_numbering_rollouts_and_passes_agree_and_requests_pass_the_engine_check(data_dir):
    """rollout.backend=vllm makes the video policy number positions as vLLM does
    (models/vlm_rope.py): the native sampler's log-probs still equal the teacher-forced
    passes', and every request is one the vLLM backend would send (engine_prompt's check)."""
    from longrl.models import vlm_rope
    from longrl.recipes.grpo import rollout
    from longrl.rollout.hf import HFBackend
    from longrl.rollout.vllm import engine_prompt
    from longrl.streambp.logprobs import make_batch

    cfg = load_config(None, [*TINY, f"task.train_file={data_dir}/train.jsonl"])
    cfg.rollout.backend = "vllm"  # set after validation: vLLM itself is not needed for the passes
    task = load_task(cfg)
    torch.manual_seed(0)
    model, tok = load_video_policy(cfg.model, torch.device("cpu"))
    model = model.double()
    policy = VideoPolicy(model, tok, task, cfg)
    assert vlm_rope.numbering(model) == "vllm"
    examples = task.train[:2]
    for req in policy.requests(examples, 2):
        payload = engine_prompt(req, model.config)  # raises unless the positions are vLLM's
        assert payload["multi_modal_data"]["video"]["video_embeds"].shape[0] == req.media.video.n_tokens
    backend = HFBackend(model, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    roll = rollout(policy, backend, examples, task, cfg, torch.Generator().manual_seed(0), version=0)
    batch = make_batch(roll.prompt_ids, roll.response_ids, tok.pad_token_id)
    lp = policy.logprobs(batch, roll.examples, temperature=1.0)
    for i, b in enumerate(roll.behaviour_logprobs):
        torch.testing.assert_close(lp[i][batch.mask[i] > 0], torch.tensor(b, dtype=torch.float64), atol=1e-9, rtol=0)
