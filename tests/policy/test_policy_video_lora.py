"""LoRA on the video policy (tiny Qwen2.5-VL): adapters on the language model only, adapter
gradients against a brute-force reference (the model's own pixel forward with W + s*B@A
written out), merge == adapter forward, the disabled adapter is the base exactly, and
`longrl train model.lora.r=...` on videos: GRPO with KL and multi-round DPO, resumed
exactly after a crash."""

import copy
import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("av", reason="video tests need PyAV (pip install -e '.[video]')")
pytest.importorskip("peft")

from longrl.checkpoint import load_trainer_state  # noqa: E402
from longrl.cli import main  # noqa: E402
from longrl.config import LoRAConfig, load_config  # noqa: E402
from longrl.data import video_task as V  # noqa: E402
from longrl.errors import UserError  # noqa: E402
from longrl.models import lora  # noqa: E402
from longrl.models.vlm import patchify, vision_tag  # noqa: E402
from longrl.policy.video import VideoPolicy, load_video_policy  # noqa: E402
from longrl.rewards.verifiers import answer_scorer  # noqa: E402
from longrl.streambp.logprobs import make_batch  # noqa: E402

TINY = [
    "task.name=videos", "task.n_train=6", "task.n_eval=2", "task.kwargs.kinds=colour",
    "task.kwargs.min_seconds=3", "task.kwargs.max_seconds=5",
    "model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.intermediate_size=64",
    "video.max_frames=4", "video.max_pixels=3136", "run.progress=false",
]
LORA = LoRAConfig(r=4, alpha=8.0)
RESPONSES = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17]]  # uneven lengths: padding


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("vdata") / "videos"
    V.load_video_task(load_config(None, [*TINY, f"task.train_file={d}/train.jsonl"]), answer_scorer("mcq"))
    return d


def _setup(data_dir, backprop="chunked"):
    """(cfg, task, plain base copy, adapted float64 model, tokenizer); the adapter's B is
    random (not zero), so it changes the model and every adapter weight gets a gradient."""
    cfg = load_config(None, [*TINY, f"task.train_file={data_dir}/train.jsonl", f"train.backprop={backprop}",
                             "train.stream_chunk=5"])
    task = V.load_video_task(cfg, answer_scorer("mcq"))
    torch.manual_seed(0)
    model, tok = load_video_policy(cfg.model, torch.device("cpu"))
    model = model.double()
    base = copy.deepcopy(model)
    lora.apply_lora(model, LORA)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    return cfg, task, base, model, tok


def _batch(policy, task, rows=(0, 0, 1)):
    """Three rows on two videos (two share a prompt), uneven response lengths."""
    examples = [task.train[i] for i in rows]
    policy.start_step()
    return examples, make_batch(policy.encode_prompts(examples), RESPONSES, policy.tokenizer.pad_token_id)


def test_adapters_sit_on_the_language_model_only_and_the_tower_stays_frozen(data_dir):
    _, _, base, model, _ = _setup(data_dir)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n and ".language_model." in n for n in trained)
    assert not any("lora_" in n for n, _ in model.model.visual.named_parameters())
    tag = vision_tag(model)
    assert tag == vision_tag(base)
    lora.merge_adapter(model)  # merged: every weight trainable as before the adapter, the tower still frozen
    assert not any(p.requires_grad for p in model.model.visual.parameters())
    assert all(p.requires_grad for p in model.model.language_model.parameters())
    assert vision_tag(model) == tag  # the embedding cache's key is unchanged


@pytest.mark.parametrize("backprop", ["chunked", "streambp"])
@pytest.mark.parametrize("rows, tol", [((0, 1, 2), 1e-12), ((0, 0, 1), 1e-6)], ids=["own-prompts", "shared-prompt"])
def test_adapter_gradients_equal_a_brute_force_reference(data_dir, backprop, rows, tol):
    """`tol` relative to the largest gradient entry. Where two rows share a prompt the
    chunked path runs it once and sums their gradients before the RMSNorm's float32
    backward (tests/policy/test_policy_video.py): ~1e-7 of the largest entry in float64."""
    cfg, task, base, model, tok = _setup(data_dir, backprop)
    policy = VideoPolicy(model, tok, task, cfg)
    examples, batch = _batch(policy, task, rows)
    weights = torch.linspace(0.5, 1.5, batch.input_ids.shape[1], dtype=torch.float64)  # [T]

    def loss_fn(logp):  # [b, T]; not a plain sum, so every position's gradient differs
        return -(logp * weights * batch.mask).sum() + 0.1 * ((logp * batch.mask).sum(-1) ** 2).sum()

    loss, _, _ = policy.loss_and_backward(batch, examples, loss_fn, temperature=1.0)
    got = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert got and all(g is not None for g in got.values())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)  # the base is frozen

    # Brute force: the plain model's own forward with the video's pixels (tower run per
    # row, full [T, V] logits), W + (alpha / r) * B @ A written out, autograd on A and B.
    scale = LORA.alpha / LORA.r
    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters() if "lora_" in n}
    params = dict(base.named_parameters())
    for name in {n.split(".lora_")[0] for n in leaves}:
        A, B = leaves[f"{name}.lora_A.default.weight"], leaves[f"{name}.lora_B.default.weight"]
        params[f"{name}.weight"] = params[f"{name}.weight"].detach() + scale * B @ A
    rows = []
    for i, ex in enumerate(examples):
        clip = task.clips[ex.media[0]]
        pv, grid = patchify(clip.frames)
        ids = batch.input_ids[i:i + 1]  # [1, T]
        logits = torch.func.functional_call(base, params, (), dict(
            input_ids=ids, pixel_values_videos=pv.double(), video_grid_thw=grid.view(1, 3),
            mm_token_type_ids=(ids == base.config.video_token_id).int() * 2,
            second_per_grid_ts=torch.tensor([clip.second_per_grid]), use_cache=False)).logits  # [1, T, V]
        rows.append(torch.log_softmax(logits[0], -1).gather(-1, batch.targets[i, :, None]).squeeze(-1))  # [T]
    want = loss_fn(torch.stack(rows))
    want.backward()
    torch.testing.assert_close(torch.as_tensor(float(loss), dtype=torch.float64), want.detach(), rtol=1e-9, atol=0)
    assert set(got) == set(leaves)
    for name, leaf in leaves.items():
        torch.testing.assert_close(got[name], leaf.grad, rtol=0, atol=tol * float(leaf.grad.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_disabled_adapter_gives_the_base_logprobs_exactly(data_dir):
    cfg, task, base, model, tok = _setup(data_dir)
    policy = VideoPolicy(model, tok, task, cfg)
    examples, batch = _batch(policy, task)
    with lora.DisabledAdapter(model) as off:
        disabled = policy.logprobs(batch, examples, model=off)
    plain = VideoPolicy(base, tok, task, cfg)  # its own embeddings, from the untouched copy
    plain.encode_prompts(examples)
    assert torch.equal(disabled, plain.logprobs(batch, examples))
    adapted = policy.logprobs(batch, examples)
    assert (adapted - disabled).abs().max() > 1e-3  # the adapter is on again, and it matters


def test_merge_equals_the_adapter_forward_and_a_new_adapter_starts_from_it(data_dir):
    cfg, task, _, model, tok = _setup(data_dir)
    policy = VideoPolicy(model, tok, task, cfg)
    examples, batch = _batch(policy, task)
    adapted = policy.logprobs(batch, examples)
    merged_weights = lora.merged_state_dict(model)
    lora.new_adapter(model, LORA, base_moved=True)  # merge in place, then a fresh adapter (B = 0)
    after = policy.logprobs(batch, examples)
    with lora.DisabledAdapter(model) as off:
        base_now = policy.logprobs(batch, examples, model=off)
    torch.testing.assert_close(after, adapted, rtol=0, atol=1e-10)
    assert torch.equal(after, base_now)  # the fresh adapter adds exactly nothing
    merged_now = lora.base_state_dict(model)
    assert set(merged_now) == set(merged_weights)
    for k, v in merged_weights.items():
        torch.testing.assert_close(merged_now[k], v, rtol=0, atol=1e-12)


def test_lora_with_a_trainable_tower_is_refused():
    with pytest.raises(UserError, match="video.train_vision"):
        load_config(None, [*TINY, "model.lora.r=4", "video.train_vision=true"])


# ----------------------------------------------------------------------------------------
# `longrl train` on videos with LoRA
# ----------------------------------------------------------------------------------------

RUN = ["sft.steps=30", "sft.lr=1e-2", "sft.batch_size=3", "sft.warmup_steps=1", "rl.steps=4",
       "rl.prompts_per_step=2", "rl.group_size=4", "rl.micro_batch_size=4", "rl.eval_every=0", "run.save_every=2",
       "rollout.max_new_tokens=20", "eval.max_new_tokens=20", "model.lora.r=4", "model.lora.alpha=8"]


def _rl_records(run):
    """RL metrics without times and video counts (a resumed run re-encodes its videos)."""
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "video/"))} for r in recs if r["phase"] == "rl"]


def _crash_after_step_2(full, crashed):
    shutil.copytree(full, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step_4")
    lines = (crashed / "metrics.jsonl").read_text().splitlines()
    (crashed / "metrics.jsonl").write_text("\n".join(lines[:-2]) + "\n")  # the step-3 and step-4 records
    (crashed / "summary.json").unlink()
    return crashed


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["rl.kl_coef=0.05"],
                                   ["rl.algorithm=dpo", "rl.dpo_beta=0.5", "rl.dpo_rounds=2"]],
                         ids=["grpo_kl", "dpo_rounds"])
def test_video_lora_run_trains_the_adapter_and_resumes_exactly(tmp_path, data_dir, extra):
    """SFT trains every weight but the tower (model.lora.sft=auto on the tiny model), so
    that rewards vary and RL's adapter has gradients."""
    args = ["train", *TINY, *RUN, *extra, f"task.train_file={data_dir}/train.jsonl", f"run.out_dir={tmp_path}"]
    assert main([*args, "run.name=full"]) == 0
    full = tmp_path / "full"
    crashed = _crash_after_step_2(full, tmp_path / "crashed")
    assert main(["train", f"resume={crashed}", "run.progress=false"]) == 0
    recs = _rl_records(full)
    assert _rl_records(crashed) == recs and [r["step"] for r in recs] == [0, 1, 2, 3, 4]
    ckpt = full / "checkpoints" / "step_4"
    for name in ("model.safetensors", f"{lora.ADAPTER_DIR}/adapter_model.safetensors"):
        wa, wb = load_file(ckpt / name), load_file(crashed / "checkpoints" / "step_4" / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    # Only adapters trained in RL: AdamW's moments are the adapter's, the tower is step_0's.
    saved = load_trainer_state(ckpt)
    moments = sum(s["exp_avg"].numel() for s in saved["optimizer"]["state"].values())
    adapter = load_file(ckpt / lora.ADAPTER_DIR / "adapter_model.safetensors")
    assert moments == sum(v.numel() for v in adapter.values()) > 0
    assert all(".language_model." in k for k in adapter)
    step0, step4 = load_file(full / "checkpoints" / "step_0" / "model.safetensors"), load_file(ckpt / "model.safetensors")
    tower = [k for k in step0 if "visual" in k]  # (the file's names are transformers' on-disk ones)
    adapted = [k for k in step0 if "visual" not in k and k.endswith("proj.weight")]
    assert tower and adapted and step0.keys() == step4.keys()
    assert all(torch.equal(step0[k], step4[k]) for k in tower)
    assert any(not torch.equal(step0[k], step4[k]) for k in adapted)
    if "rl.dpo_rounds=2" in extra:
        assert [r.get("dpo/round") for r in recs[1:]] == [1, 1, 2, 2]
        assert all(r["dpo/pairs"] > 0 for r in recs[1:])
        assert not (full / "checkpoints" / "step_2" / lora.BASE_FILE).exists()
        assert (ckpt / lora.BASE_FILE).is_file()  # round 2's base is round 1's merged model
    else:
        assert any(r.get("kl/mean", 0.0) > 0 for r in recs[1:])


def test_adapter_sft_on_video_merges_into_the_language_model_before_rl(tmp_path, data_dir):
    args = ["train", *TINY, f"task.train_file={data_dir}/train.jsonl", f"run.out_dir={tmp_path}", "run.name=s",
            "sft.steps=3", "sft.batch_size=3", "rl.steps=0", "model.lora.r=4", "model.lora.sft=true"]
    assert main(args) == 0
    step0 = tmp_path / "s" / "checkpoints" / "step_0"
    cfg = load_config(None, args[1:])
    torch.manual_seed(cfg.train.seed)
    init, _ = load_video_policy(replace(cfg.model, lora=LoRAConfig(r=0)), torch.device("cpu"))  # before SFT
    init_tensors = lora._saved_names(init)  # on-disk name -> model name
    want = init.state_dict()
    after = load_file(step0 / "model.safetensors")
    changed = [k for k, v in after.items() if not torch.equal(v, want[init_tensors.get(k, k)])]
    assert changed and all("visual" not in k and k.endswith("proj.weight") for k in changed)  # adapted layers only
    adapter = load_file(step0 / lora.ADAPTER_DIR / "adapter_model.safetensors")
    assert adapter and all(not v.any() for k, v in adapter.items() if "lora_B" in k)  # RL's adapter starts fresh
