"""Online DPO (`rl.algorithm=dpo`): the loss by hand, pair choice, and one step's gradient
against a brute-force full-batch reference, whatever the micro-batch size."""

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from longrl.config import Config, load_config
from longrl.data.example import Example
from longrl.errors import UserError
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


def _step_grads(model, cfg, monkeypatch):
    roll = _rollouts(model.config.vocab_size)
    monkeypatch.setattr(dpo, "collect", lambda *a, **k: (roll, {}))
    grads = {}

    def capture(model, optimizer, scheduler, grad_clip):
        grads.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        return 0.0

    monkeypatch.setattr(dpo, "clip_and_step", capture)
    state = grpo.init_state(model, cfg, n_train=N)
    metrics = dpo.dpo_step(model, SimpleNamespace(pad_token_id=0), None, cfg, state)
    return grads, metrics, roll


def _reference_grads(model, roll, beta):
    """Brute force: full logits of every pair's chosen and rejected sequence, one loss, one backward."""
    ref_model = grpo.copy.deepcopy(model)

    def seq_logp(m, i):
        ids = torch.tensor([roll.prompt_ids[i] + roll.response_ids[i]])
        logp = torch.log_softmax(m(ids).logits[0, :-1].double(), -1)
        targets = ids[0, 1:]
        return logp.gather(-1, targets[:, None]).squeeze(-1)[len(roll.prompt_ids[i]) - 1:].sum()

    pairs = dpo.pick_pairs(roll.rewards, G)
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
