"""The GLA LM as a Hugging Face model the recipes train: decoding cache with left padding,
save / AutoModelForCausalLM round trip, and `longrl train model.arch=gla` end to end."""
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from longrl.cli import main
from longrl.config import load_config
from longrl.errors import UserError
from longrl.models.gla import GLAConfig
from longrl.models.gla_hf import GLACache, build_gla_model
from longrl.rollout.engine import generate
from longrl.streambp.logprobs import loss_and_backward, make_batch, sequence_logprobs

PAD, EOS, VOCAB = 0, 1, 40


def _model(softmax_every, seed=0):
    torch.manual_seed(seed)
    # window 3 < prompt lengths: decoding must drop keys that leave the window
    shape = GLAConfig(vocab_size=VOCAB, d_model=16, num_layers=3, num_heads=2, mlp_hidden=24, chunk_size=4,
                      softmax_every=softmax_every, window=3)
    return build_gla_model(shape, pad_token_id=PAD, eos_token_id=EOS).double()


def _prompts(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, VOCAB, (n,), generator=gen).tolist() for n in (7, 2, 11, 5)]


@pytest.mark.parametrize("softmax_every", [0, 2])
def test_engine_logprobs_equal_teacher_forced_with_left_padding(softmax_every):
    model, prompts = _model(softmax_every), _prompts()
    gens = generate(model, prompts, max_new_tokens=9, eos_id=EOS, pad_id=PAD,
                    generator=torch.Generator().manual_seed(3))
    responses = [g.response_ids for g in gens]
    batch = make_batch(prompts, responses, PAD)
    ref = sequence_logprobs(model, batch, chunk=5)  # [B, T], right-padded, no cache
    for i, g in enumerate(gens):
        p = len(prompts[i])
        torch.testing.assert_close(torch.tensor(g.logprobs, dtype=torch.float64),
                                   ref[i, p - 1 : p - 1 + len(g.logprobs)], atol=1e-6, rtol=0)


@pytest.mark.parametrize("softmax_every", [0, 2])
def test_greedy_batched_generation_equals_one_by_one(softmax_every):
    model, prompts = _model(softmax_every, seed=4), _prompts(seed=5)
    kw = dict(max_new_tokens=8, eos_id=EOS, pad_id=PAD, temperature=0.0)
    batched = generate(model, prompts, **kw)
    for p, g in zip(prompts, batched):
        (alone,) = generate(model, [p], **kw)
        assert alone.response_ids == g.response_ids
        torch.testing.assert_close(torch.tensor(alone.logprobs), torch.tensor(g.logprobs), atol=1e-9, rtol=0)


def test_padding_leaves_the_recurrent_state_untouched():
    model = _model(0)
    ids = torch.tensor([[PAD, PAD, 5, 6, 7], [0, 0, 0, 0, 0]])[:1]
    mask = torch.tensor([[0, 0, 1, 1, 1]])
    padded = model(ids, attention_mask=mask, use_cache=True).past_key_values
    alone = model(ids[:, 2:], use_cache=True).past_key_values
    assert isinstance(padded, GLACache)
    for a, b in zip(padded.layers, alone.layers):
        torch.testing.assert_close(a.S, b.S, atol=1e-12, rtol=0)


def test_save_and_auto_model_round_trip(tmp_path):
    model = _model(2).float()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and loaded.config.softmax_every == 2
    assert loaded.lm_head.weight is loaded.model.embed.weight  # tied, as saved
    ids = torch.randint(2, VOCAB, (2, 13))
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


# A fresh interpreter that cannot import longrl at all (a meta-path hook refuses it), so
# the checkpoint's own copy of the modelling files is what runs.
_REMOTE_LOAD = """
import sys
class NoLongrl:
    def find_spec(self, name, path=None, target=None):
        if name == "longrl" or name.startswith("longrl."):
            raise ImportError("this process must not import longrl")
sys.meta_path.insert(0, NoLongrl())
import torch
from transformers import AutoModelForCausalLM
ckpt, ref = sys.argv[1], torch.load(sys.argv[2])
model = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True, local_files_only=True)
assert not any(m == "longrl" or m.startswith("longrl.") for m in sys.modules)
assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
torch.testing.assert_close(model(ref["ids"]).logits, ref["logits"], atol=0, rtol=0)
print("loaded", type(model).__name__)
"""


def test_gla_hf_imports_on_its_own():
    """No import circle: the HF model module imports in a fresh interpreter by itself."""
    out = subprocess.run([sys.executable, "-c", "import longrl.models.gla_hf as m; print(m.MODEL_TYPE)"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "longrl_gla", out.stderr[-2000:]


def test_checkpoint_loads_in_plain_transformers_with_trust_remote_code(tmp_path):
    from longrl.models.load import save_policy
    from longrl.models.tiny import build_tiny_tokenizer

    model = _model(2).float()  # hybrid: both the GLA and the sliding-window layers run
    ckpt = tmp_path / "ckpt"
    save_policy(model, build_tiny_tokenizer(), ckpt)
    config = json.loads((ckpt / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "gla_hf.LongrlGLAConfig",
                                  "AutoModelForCausalLM": "gla_hf.LongrlGLAForCausalLM"}
    assert (ckpt / "gla_hf.py").is_file() and (ckpt / "gla.py").is_file()
    ids = torch.randint(2, VOCAB, (2, 13), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, tmp_path / "ref.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    out = subprocess.run([sys.executable, "-c", _REMOTE_LOAD, str(ckpt), str(tmp_path / "ref.pt")], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0 and "loaded LongrlGLAForCausalLM" in out.stdout, out.stderr[-3000:]


def test_chunked_and_checkpoint_backprop_give_the_same_gradients():
    model, prompts = _model(2), _prompts()
    batch = make_batch(prompts, [[3, 4, 5]] * len(prompts), PAD)
    grads = []
    for mode in ("standard", "chunked", "checkpoint"):
        model.zero_grad()
        loss_and_backward(model, batch, lambda lp: -(lp.sum()), mode=mode, chunk=4)
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(grads[2], grads[0], atol=1e-10, rtol=0)


def test_config_refuses_what_gla_cannot_run():
    with pytest.raises(UserError, match="model.arch"):
        load_config(None, ["model.arch=mamba"])
    with pytest.raises(UserError, match="streambp"):
        load_config(None, ["model.arch=gla", "train.backprop=streambp"])


TINY_GLA = [
    "model.arch=gla", "model.gla.softmax_every=2", "model.gla.window=8",
    "model.tiny.hidden_size=32", "model.tiny.num_layers=2", "model.tiny.intermediate_size=64",
    "task.n_train=100", "task.n_eval=6", "sft.steps=3", "sft.batch_size=4",
    "rl.steps=2", "rl.prompts_per_step=2", "rl.group_size=3", "rl.micro_batch_size=4",
    "rl.eval_every=2", "rollout.max_new_tokens=10", "eval.max_new_tokens=10",
    "run.save_every=2", "run.progress=false",
    "rl.kl_coef=0.05",  # every RL step updates (this untrained model's rewards are all 0: no signal otherwise)
]


def test_train_and_eval_a_gla_model(tmp_path, capsys):
    assert main(["train", f"run.out_dir={tmp_path}", "run.name=g", *TINY_GLA]) == 0
    run = tmp_path / "g"
    summary = json.loads((run / "summary.json").read_text())
    assert 0.0 <= summary["accuracy_after_rl"] <= 1.0
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    gaps = [r["logprob/engine_trainer_gap"] for r in recs if "logprob/engine_trainer_gap" in r]
    assert gaps and max(gaps) < 1e-4  # engine (cached, left-padded) and trainer agree
    ckpt = run / "checkpoints" / "step_2"
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "longrl_gla"
    assert (ckpt / "gla_hf.py").is_file() and (ckpt / "gla.py").is_file()  # trust_remote_code loading
    capsys.readouterr()
    assert main(["eval", f"model={ckpt}", "task.n_eval=4", "eval.max_new_tokens=6"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 4


def _sp_rank(rank, world, errs_path):
    from longrl.parallel import dist as ldist
    from longrl.parallel import sp_train
    from longrl.streambp import logprobs as streambp

    ldist.setup_layout(world)
    out = {}
    for softmax_every in (0, 2):  # pure GLA (All-Scan) and the hybrid (+ sliding-window halo)
        model = _model(softmax_every).double()
        prompts = _prompts()
        batch = make_batch(prompts, [[3, 4, 5, 6][: 1 + i % 4] for i in range(len(prompts))], PAD)  # T = 15, odd
        weights = torch.linspace(0.5, 2.0, batch.input_ids.shape[1], dtype=torch.float64)

        def loss_fn(lp, weights=weights):  # token and sequence-level terms: the loss needs whole rows
            return -(lp * weights).sum() + 0.1 * (lp.sum(-1) ** 2).sum()

        model.zero_grad()
        ref_loss, _, ref_logp = streambp.loss_and_backward(model, batch, loss_fn, mode="chunked", chunk=4)
        ref_grads = [p.grad.clone() for p in model.parameters()]
        ref_seq = streambp.sequence_logprobs(model, batch, chunk=4)
        model.zero_grad()
        loss, _, logp = sp_train.loss_and_backward(model, batch, loss_fn, mode="chunked", chunk=4)
        for p in model.parameters():  # the SP ranks' gradient shares add up to the whole
            torch.distributed.all_reduce(p.grad)
        seq = sp_train.sequence_logprobs(model, batch, chunk=4)
        errs = [(loss - ref_loss).abs().item(), (logp - ref_logp).abs().max().item(), (seq - ref_seq).abs().max().item()]
        errs += [(p.grad - g).abs().max().item() for p, g in zip(model.parameters(), ref_grads)]
        assert max(errs) < 1e-9, (softmax_every, errs)
        out[softmax_every] = errs
    if rank == 0:
        errs_path.write_text(json.dumps(out))


def test_sequence_parallel_gla_equals_one_process(tmp_path):
    from longrl.parallel.local_spawn import spawn_local

    spawn_local(_sp_rank, 2, tmp_path / "errs.json", start_method="fork")
    errs = json.loads((tmp_path / "errs.json").read_text())
    assert set(errs) == {"0", "2"} and all(len(e) > 3 for e in errs.values())


def test_sequence_parallel_refuses_what_gla_cannot_shard():
    from longrl.parallel.sp_train import check_sp_model

    check_sp_model(_model(0), 2, "chunked")  # pure GLA: All-Scan
    check_sp_model(_model(2), 2, "chunked")  # hybrid: All-Scan + the sliding-window halo
    with pytest.raises(UserError, match="chunked"):
        check_sp_model(_model(0), 2, "checkpoint")


def test_gla_trains_with_april_partial_rollouts_from_scratch_and_from_a_checkpoint(tmp_path):
    april = ["rollout.partial=true", "rollout.over_provision=2.0", "rollout.offpolicy=tis"]
    assert main(["train", f"run.out_dir={tmp_path}", "run.name=g", *TINY_GLA, *april]) == 0
    recs = [json.loads(x) for x in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    rl = [r for r in recs if r["phase"] == "rl" and r["step"] > 0]
    assert [r["step"] for r in rl] == [1, 2]
    assert all("rollout/offpolicy_frac" in r and r["logprob/engine_trainer_gap"] < 1e-4 for r in rl)
    ckpt = tmp_path / "g" / "checkpoints" / "step_0"
    args = [a for a in TINY_GLA if not a.startswith(("model.arch", "model.gla", "model.tiny"))]
    assert main(["train", f"model.path={ckpt}", *april, f"run.out_dir={tmp_path}", "run.name=april", *args]) == 0
    assert (tmp_path / "april" / "checkpoints" / "step_2" / "model.safetensors").is_file()
