"""Online DPO (`rl.algorithm=dpo`): the loss by hand, pair choice, and one step's gradient
against a brute-force full-batch reference, whatever the micro-batch size."""

import copy
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from longrl.config import Config, load_config
from longrl.data.example import Example
from longrl.errors import UserError
from longrl.policy.text import TextPolicy
from longrl.recipes import dpo, grpo
from longrl.rl.losses import dpo_loss

G, N = 4, 3  # samples per prompt, prompts


def test_dpo_loss_hand_worked():
    loss, margin = dpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -2.0]), torch.tensor([-2.0, -2.0]),
                            torch.tensor([-2.0, -1.0]), beta=0.5, normalizer=4.0)
    # pair 1: 0.5 * ((-1 + 2) - (-3 + 2)) = 1; pair 2: 0.5 * ((0) - (-1)) = 0.5
    torch.testing.assert_close(margin, torch.tensor([1.0, 0.5]))
    want = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(-0.5))) / 4
    assert float(loss) == pytest.approx(want, rel=1e-6)
    chosen = torch.tensor([-1.0], requires_grad=True)
    dpo_loss(chosen, torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), 0.5, 1.0)[0].backward()
    assert float(chosen.grad) == pytest.approx(-0.5 / (1 + math.exp(1.0)), rel=1e-6)  # -beta * sigmoid(-margin)


def test_pairs_are_the_first_best_and_first_worst_of_each_varied_group():
    rewards = torch.tensor([0.1, 1.1, 1.1, 0.1,  0.5, 0.5, 0.5, 0.5,  1.0, 0.0, 0.0, 1.0])
    assert dpo.pick_pairs(rewards, 4) == [(1, 0), (8, 9)]  # the constant middle group gives none


def _rollouts(vocab):
    gen = torch.Generator().manual_seed(3)
    ids = lambda n: torch.randint(2, vocab, (n,), generator=gen).tolist()  # noqa: E731
    prompts = [ids(n) for n in (5, 9, 3) for _ in range(G)]
    responses = [ids(n) for n in (1, 6, 4, 2, 9, 4, 11, 3, 1, 7, 5, 13)]
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.2, 1.1, 0.0, 1.1])  # group 2 gives no pair
    return grpo.Rollouts([Example(id=str(i // G), prompt="", answer="") for i in range(N * G)], prompts, responses,
                         [[0.0] * len(r) for r in responses], [[0] * len(r) for r in responses],
                         torch.zeros(N * G, dtype=torch.bool), rewards, {"correctness": rewards})


def _capture_grads(monkeypatch) -> dict:
    """Replace the recipe's optimizer step with one that keeps the step's gradients (no update)."""
    grads = {}

    def capture(model, optimizer, scheduler, grad_clip, **kwargs):
        grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return 0.0

    monkeypatch.setattr(dpo, "clip_and_step", capture)
    return grads


def _step_grads(model, cfg, monkeypatch):
    roll = _rollouts(model.config.vocab_size)
    monkeypatch.setattr(dpo, "collect", lambda *a, **k: (roll, {}))
    grads = _capture_grads(monkeypatch)
    state = grpo.init_state(model, cfg, n_train=N)
    policy = TextPolicy.from_config(model, SimpleNamespace(pad_token_id=0), cfg)
    metrics = dpo.dpo_step(policy, None, None, cfg, state)  # collect is replaced: no backend needed
    return grads, metrics, roll


def _reference_grads(model, roll, beta, pairs=None):
    """Brute force: full logits of every pair's chosen and rejected sequence, one loss, one backward."""
    ref_model = copy.deepcopy(model)

    def seq_logp(m, i):
        ids = torch.tensor([roll.prompt_ids[i] + roll.response_ids[i]])
        logp = torch.log_softmax(m(ids).logits[0, :-1].double(), -1)
        targets = ids[0, 1:]
        return logp.gather(-1, targets[:, None]).squeeze(-1)[len(roll.prompt_ids[i]) - 1:].sum()

    pairs = dpo.pick_pairs(roll.rewards, G) if pairs is None else pairs
    model.zero_grad()
    loss = 0.0
    for c, r in pairs:
        with torch.no_grad():
            ref_c, ref_r = seq_logp(ref_model, c), seq_logp(ref_model, r)
        margin = beta * ((seq_logp(model, c) - ref_c) - (seq_logp(model, r) - ref_r))
        loss = loss - torch.nn.functional.logsigmoid(margin) / len(pairs)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("micro", [2, 4, 64])
def test_one_step_gradient_equals_the_full_batch_reference(tiny_qwen, monkeypatch, micro):
    cfg = Config()
    cfg.rl = replace(cfg.rl, algorithm="dpo", dpo_beta=0.3, group_size=G, prompts_per_step=N, micro_batch_size=micro)
    cfg.train = replace(cfg.train, stream_chunk=4)
    model = tiny_qwen(dtype=torch.float64, tie=False)
    reference = _reference_grads(tiny_qwen(dtype=torch.float64, tie=False), _rollouts(50), beta=0.3)
    grads, metrics, _ = _step_grads(model, cfg, monkeypatch)
    assert grads.keys() == reference.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], reference[name], atol=1e-12, rtol=1e-9, msg=name)
    assert metrics["dpo/pairs"] == 2 and metrics["dpo/accuracy"] == 0.0  # policy == reference: margins 0
    assert metrics["loss/dpo"] == pytest.approx(math.log(2), rel=1e-9)


def test_config_refuses_what_dpo_does_not_run():
    with pytest.raises(UserError, match="rollout.partial"):
        load_config(None, ["rl.algorithm=dpo", "rollout.partial=true"])
    with pytest.raises(UserError, match="dpo_beta"):
        load_config(None, ["rl.algorithm=dpo", "rl.dpo_beta=0"])
    with pytest.raises(UserError, match="rl.algorithm"):
        load_config(None, ["rl.algorithm=ppo"])


# ---- offline DPO: pairs from the data's "chosen" / "rejected" responses ---------------------


def _preference_file(path, n=40, broken_line=None):
    import json
    import random

    rng = random.Random(0)
    lines = []
    for i in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        line = {"prompt": f"{a}+{b}=", "answer": str(a + b), "chosen": f"<answer>{a + b}</answer>",
                "rejected": f"<answer>{a + b + rng.randint(1, 9)}</answer>"}
        if i == broken_line:
            del line["rejected"]
        lines.append(json.dumps(line))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_offline_dpo_step_gradient_equals_the_full_batch_reference(tmp_path, monkeypatch):
    from longrl.recipes.tasks import load_task
    from longrl.models.tiny import build_tiny_tokenizer
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tiny_tokenizer()
    cfg = load_config(None, ["task.name=jsonl", f"task.train_file={_preference_file(tmp_path / 'p.jsonl')}",
                             "rl.algorithm=dpo", "rl.dpo_source=data", "rl.dpo_beta=0.2", "rl.prompts_per_step=5",
                             "rl.micro_batch_size=4", "train.stream_chunk=3"])
    task = load_task(cfg.task)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)).double()
    state = grpo.init_state(model, cfg, n_train=len(task.train))
    examples = [task.train[i] for i in grpo.DataCursor(cfg.train.seed, len(task.train)).take(5)]
    policy = TextPolicy.from_config(model, tok, cfg)
    _, prompts, responses, pairs = dpo.data_pairs(policy, task, cfg, grpo.GRPOState(
        None, None, None, grpo.DataCursor(cfg.train.seed, len(task.train))))
    assert pairs == [(i, 5 + i) for i in range(5)]
    assert tok.decode(responses[0][:-1]) == examples[0].meta["chosen"] and responses[0][-1] == tok.eos_token_id
    roll = SimpleNamespace(prompt_ids=prompts, response_ids=responses,
                           rewards=torch.tensor([1.0] * 5 + [0.0] * 5))
    reference = _reference_grads(copy.deepcopy(model), roll, beta=0.2, pairs=pairs)
    grads = _capture_grads(monkeypatch)
    metrics = dpo.dpo_step(policy, None, task, cfg, state)  # offline: nothing sampled
    assert metrics["dpo/pairs"] == 5
    for name in reference:
        torch.testing.assert_close(grads[name], reference[name], atol=1e-12, rtol=1e-9, msg=name)


def test_offline_dpo_trains_end_to_end_and_bad_data_is_refused(tmp_path, capsys):
    import json

    from longrl.cli import main

    tiny = ["model.tiny.hidden_size=32", "model.tiny.num_layers=1", "model.tiny.intermediate_size=64",
            "task.name=jsonl", "task.n_eval=4", "sft.steps=0", "rl.steps=12", "rl.prompts_per_step=8",
            "rl.lr=3e-3", "rl.warmup_steps=0", "rl.algorithm=dpo", "rl.dpo_source=data", "rl.dpo_beta=0.5",
            "rl.eval_every=0", "eval.max_new_tokens=8", "run.progress=false"]
    good = _preference_file(tmp_path / "good.jsonl")
    assert main(["train", f"task.train_file={good}", f"run.out_dir={tmp_path}", "run.name=d", *tiny]) == 0
    recs = [json.loads(x) for x in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in recs if r["phase"] == "rl" and r["step"] > 0]
    assert rl[0]["loss/dpo"] == pytest.approx(math.log(2), rel=1e-5)  # policy == reference at the start
    assert rl[-1]["loss/dpo"] < 0.6 and rl[-1]["dpo/accuracy"] > 0.5  # it learns to prefer the chosen answers
    bad = _preference_file(tmp_path / "bad.jsonl", broken_line=3)
    capsys.readouterr()
    assert main(["train", f"task.train_file={bad}", f"run.out_dir={tmp_path}", "run.name=b", *tiny]) == 2
    assert '"chosen" and "rejected"' in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
