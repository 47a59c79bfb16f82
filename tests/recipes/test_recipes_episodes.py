"""Loss masks of tool-using episodes (issue 15): a GRPO step over hand-made two-turn
episodes has the gradient of a brute-force reference in which tool-result tokens take no
policy loss and no KL and are not counted in the normaliser (float64, tight tolerance; the
same reference with the tool tokens counted differs, so the test can fail). Also the facts
task, its corpus and its teacher, and the search tool."""

import re
from dataclasses import replace

import pytest
import torch

from longrl.config import Config
from longrl.data.example import Example
from longrl.policy.text import TextPolicy
from longrl.recipes import grpo
from longrl.rl.advantages import group_advantages
from longrl.rollout.hf import HFBackend

G, N, V = 2, 2, 40


def _model(seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                        eos_token_id=1)).double()


def _episodes():
    """Two groups of two-turn episodes: model turn, tool result (mask 0), model turn."""
    gen = torch.Generator().manual_seed(3)
    ids = lambda n: torch.randint(2, V, (n,), generator=gen).tolist()  # noqa: E731
    prompts = [ids(n) for n in (4, 4, 3, 3)]
    turns = [(3, 5, 2), (2, 4, 4), (4, 6, 1), (1, 3, 3)]  # (model, tool, model) tokens per row
    responses = [ids(a + b + c) for a, b, c in turns]
    masks = [[1] * a + [0] * b + [1] * c for a, b, c in turns]
    rewards = torch.tensor([1.0, 0.0, 0.3, 0.9])
    roll = grpo.Rollouts([Example(id=str(i // G), prompt="", answer="") for i in range(N * G)], prompts, responses,
                         [[-1.0] * len(r) for r in responses], [[0] * len(r) for r in responses],
                         torch.zeros(N * G, dtype=torch.bool), rewards, {"correctness": rewards}, masks)
    return roll


def _reference_grads(model, reference, roll, kl_coef, count_tool_tokens=False):
    """sum over model tokens of [-A_i * exp(logp - sg(logp)) + kl_coef * k3(logp, ref)] / (model tokens)."""
    model.zero_grad()
    adv = group_advantages(roll.rewards, G, "grpo").double()
    masks = [[1] * len(m) for m in roll.loss_masks] if count_tool_tokens else roll.loss_masks
    D = sum(sum(m) for m in masks)
    total = 0.0
    for i, (p, r, m) in enumerate(zip(roll.prompt_ids, roll.response_ids, masks)):
        x = torch.tensor([p + r])
        sl = slice(len(p) - 1, len(p) + len(r) - 1)
        tgt = torch.tensor(r)
        logp = torch.log_softmax(model(x).logits[0, sl], -1)[torch.arange(len(r)), tgt]
        with torch.no_grad():
            ref = torch.log_softmax(reference(x).logits[0, sl], -1)[torch.arange(len(r)), tgt]
        k3 = torch.exp(ref - logp) - (ref - logp) - 1
        per_token = -adv[i] * torch.exp(logp - logp.detach()) + kl_coef * k3
        total = total + (per_token * torch.tensor(m, dtype=per_token.dtype)).sum() / D
    total.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("micro", [1, 4])
def test_tool_tokens_take_no_loss_no_kl_and_are_not_counted(monkeypatch, micro):
    model = _model()
    cfg = Config()
    cfg.rl = replace(cfg.rl, group_size=G, prompts_per_step=N, kl_coef=0.1, micro_batch_size=micro)
    state = grpo.init_state(model, cfg, n_train=N)
    with torch.no_grad():  # the reference differs from the policy: the KL term has a gradient
        for p in state.reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    roll = _episodes()
    captured = {}

    def capture(model, *a, **k):  # the update's gradient, no optimizer step
        captured.update({n: p.grad.clone() for n, p in model.named_parameters()})
        return 0.0

    monkeypatch.setattr(grpo, "collect", lambda *a, **k: (roll, {}))
    monkeypatch.setattr(grpo, "clip_and_step", capture)
    tok = type("Tok", (), {"pad_token_id": 0, "eos_token_id": 1})()
    grpo.grpo_step(TextPolicy.from_config(model, tok, cfg), HFBackend(model, eos_id=1, pad_id=0), None, cfg, state)

    want = _reference_grads(model, state.reference, roll, 0.1)
    wrong = _reference_grads(model, state.reference, roll, 0.1, count_tool_tokens=True)
    for n in want:
        torch.testing.assert_close(captured[n], want[n], rtol=1e-9, atol=1e-12)
    assert max(float((want[n] - wrong[n]).abs().max()) for n in want) > 1e-6  # the mask matters


def test_facts_task_teacher_and_corpus():
    from longrl.config import TaskConfig
    from longrl.data.registry import load_task_examples
    from longrl.tools.search import BM25Search

    t = load_task_examples(TaskConfig(name="facts", n_train=400, n_eval=100))
    train_names = {e.prompt.split()[-2] for e in t.train}
    eval_names = {e.prompt.split()[-2] for e in t.eval}
    assert not train_names & eval_names  # held-out questions are about unseen entities
    search = BM25Search(t.corpus, 1)
    searched = direct = guessed = 0
    for e in t.train + t.eval:
        m = re.fullmatch(r"<call>search: (.*?)</call><result>(.*?)</result><answer>(.*?)</answer>", e.solution)
        if m is None:  # a direct answer: only where the prompt holds the fact
            assert e.meta["eval_group"] == "no_search" and e.solution == f"<answer>{e.answer}</answer>"
            direct += 1
            continue
        searched += 1
        assert search(m.group(1)) == m.group(2)  # the demonstration shows what the tool returns
        assert e.answer in m.group(2)
        if m.group(3) != e.answer:  # a slip: the attribute's favourite value, the result unread
            assert m.group(3) in ("red", "cat")
            guessed += 1
    assert 0.05 < direct / (searched + direct) < 0.2  # 20% of the answerable half
    assert 0.45 < guessed / searched < 0.6  # slip 0.6, and the favourite is right 1 time in 8


def test_search_corpus_files_are_checked(tmp_path):
    from longrl.errors import UserError
    from longrl.tools.search import read_corpus

    good = tmp_path / "c.jsonl"
    good.write_text('{"text": "Alpha has color red."}\n\n{"title": "Beta", "text": "pet owl"}\n')
    assert read_corpus(good) == ["Alpha has color red.", "Beta: pet owl"]
    for body, match in [('{"text": 3}\n', ":1: needs a string"), ("not json\n", ":1: not a JSON object"),
                        ("", "no documents"), ('{"text": "' + "x" * (2 << 20) + '"}\n', "longer than 1 MiB")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(body)
        with pytest.raises(UserError, match=match):
            read_corpus(bad)
