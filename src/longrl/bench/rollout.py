"""Benchmark: APRIL active partial rollouts vs synchronous rollout on a long-tail workload.

    python -m longrl.bench.rollout --json [--groups 8] [--group-size 8] [--slots 64] [--steps 8] ...

Workload. A tiny random Qwen2 (built from a config, nothing downloaded) samples at
temperature 1 through `ContinuousEngine`. A wrapper sets the EOS logit at every step so that
the chance of stopping after n response tokens is `alpha / (scale + n)`: response lengths then
have a Pareto tail, survival ~ (scale / (scale + n))^alpha, capped at `max_new_tokens`. Most
responses are short and a few run to the cap, the shape RL rollouts on reasoning tasks have.
(We bias EOS rather than give each request its own budget because lengths are then drawn by
the sampler itself, for resumed samples too, and the scheduler keeps one budget.)

Both modes use the same model, engine slot count, prompt stream, seeds and number of RL
steps, and their steps are interleaved so machine load hits both alike:
- sync:  `AprilScheduler(partial=False, over_provision=1.0)`: launch N groups, wait for all.
- april: `AprilScheduler(partial=True, over_provision=2.0)`: launch 2N groups, stop at N
  complete, park the rest, resume it first next step.
After every step the policy version is bumped (the weights are not changed: this measures the
rollout, and off-policy fractions are what a trainer would see).

The ratio it exists to show is `speedup`: useful (trained) response tokens per second, APRIL
over sync, summed over all steps; work still parked at the end counts for nothing.
`speedup_per_engine_step` is the same ratio per decode step, free of timing noise.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from longrl.rollout.april import AprilScheduler
from longrl.rollout.continuous import ContinuousEngine
from longrl.utils import pick_device

PAD_ID, EOS_ID = 0, 1


def _parse(args):
    p = argparse.ArgumentParser(prog="longrl bench rollout", description=__doc__.split("\n")[0])
    p.add_argument("--groups", type=int, default=8, help="groups (prompts) trained per step, N")
    p.add_argument("--group-size", type=int, default=8, help="samples per group, G")
    p.add_argument("--slots", type=int, default=64, help="engine decoding slots (both modes)")
    p.add_argument("--steps", type=int, default=8, help="RL steps per mode")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--alpha", type=float, default=1.0, help="Pareto tail index of response lengths")
    p.add_argument("--scale", type=float, default=8.0, help="Pareto scale (tokens) of response lengths")
    p.add_argument("--over-provision", type=float, default=2.0)
    p.add_argument("--max-staleness", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny model: 1 avoids spinning)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print only the JSON result")
    return p.parse_args(args)


class ParetoEOS(torch.nn.Module):
    """Wrap a causal LM so that P(EOS | n response tokens so far) = alpha / (scale + n).

    n is read from the position ids (every prompt has `prompt_len` tokens). The other tokens
    keep their relative probabilities.
    """

    def __init__(self, model, eos_id: int, prompt_len: int, alpha: float, scale: float):
        super().__init__()
        self.model, self.config = model, model.config
        self.eos_id, self.prompt_len, self.alpha, self.scale = eos_id, prompt_len, alpha, scale

    @property
    def dtype(self):
        return self.model.dtype

    def forward(self, input_ids, position_ids, cache=None, past_key_values=None, **kwargs):
        # Take the cache under either name and hand it on under the one the wrapped model
        # takes (`models.compat`), so neither transformers release warns.
        from longrl.models.compat import cache_kwargs

        out = self.model(input_ids=input_ids, position_ids=position_ids,
                         **cache_kwargs(self.model, cache if cache is not None else past_key_values), **kwargs)
        logits = out.logits  # [B, q, V]
        n = (position_ids[:, -logits.shape[1]:] + 1 - self.prompt_len).clamp(min=0)  # [B, q]
        hazard = (self.alpha / (self.scale + n.float())).clamp(max=0.999)  # [B, q]
        others = logits.float().clone()
        others[..., self.eos_id] = -math.inf
        eos_logit = torch.logsumexp(others, -1) + torch.log(hazard) - torch.log1p(-hazard)  # [B, q]
        logits[..., self.eos_id] = eos_logit.to(logits.dtype)
        return out


def _build_model(opt, device):
    torch.manual_seed(opt.seed)
    cfg = Qwen2Config(
        vocab_size=opt.vocab, hidden_size=opt.hidden, intermediate_size=3 * opt.hidden,
        num_hidden_layers=opt.layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=opt.prompt_len + opt.max_new_tokens + 8, tie_word_embeddings=True,
        pad_token_id=PAD_ID, eos_token_id=EOS_ID,
    )
    model = Qwen2ForCausalLM(cfg).to(device).eval()
    return ParetoEOS(model, EOS_ID, opt.prompt_len, opt.alpha, opt.scale)


def _prompts(opt, n):
    rng = random.Random(opt.seed + 1)
    return [(f"p{i}", [rng.randrange(2, opt.vocab) for _ in range(opt.prompt_len)]) for i in range(n)]


def _mode(model, opt, partial: bool, over_provision: float):
    engine = ContinuousEngine(model, opt.slots, EOS_ID, temperature=1.0, top_p=1.0, pad_token_id=PAD_ID)
    sched = AprilScheduler(engine, opt.group_size, over_provision=over_provision, max_new_tokens=opt.max_new_tokens,
                           max_staleness=opt.max_staleness, partial=partial, seed=opt.seed)
    return {"engine": engine, "sched": sched, "wall": 0.0, "steps": []}


def _one_step(m, prompt_iter, opt, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    groups, stats = m["sched"].next_step(prompt_iter, opt.groups)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    m["wall"] += dt
    m["steps"].append({"wall_s": dt, **vars(stats)})
    m["engine"].policy_version += 1  # where the optimizer step would be
    return groups


def _summary(m, truncated: int) -> dict:
    s = m["steps"]
    trained = sum(x["trained_tokens"] for x in s)
    generated = sum(x["tokens_generated"] for x in s)
    eng = m["engine"]
    parked = sum(len(x.response_ids) for g in m["sched"].buffer for x in g.samples)
    return {
        "wall_s": m["wall"],
        "trained_tokens": trained,
        "tokens_generated": generated,
        "useful_tokens_per_s": trained / m["wall"],
        "tokens_per_s": generated / m["wall"],
        "engine_steps": eng.steps,
        "trained_tokens_per_engine_step": trained / eng.steps,
        "slot_utilisation": eng.busy_slot_steps / (eng.steps * eng.num_slots),
        "offpolicy_token_frac": sum(x["offpolicy_token_frac"] * x["trained_tokens"] for x in s) / trained,
        "mean_staleness": sum(x["mean_staleness"] * x["trained_tokens"] for x in s) / trained,
        "max_staleness": max(x["max_staleness"] for x in s),
        "discarded_tokens": sum(x["discarded_tokens"] for x in s),
        "stale_resets": sum(x["stale_resets"] for x in s),
        "tokens_parked_at_end": parked,
        "mean_response_len": trained / sum(x["groups"] for x in s) / m["sched"].group_size,
        "truncated_frac": truncated / sum(x["groups"] for x in s) / m["sched"].group_size,
        "per_step_wall_s": [round(x["wall_s"], 4) for x in s],
    }


def run(args: list[str]) -> dict:
    """Run the benchmark; prints and returns the JSON result."""
    opt = _parse(args)
    if opt.threads > 0:
        torch.set_num_threads(opt.threads)
    device = pick_device(opt.device)
    model = _build_model(opt, device)
    prompts = _prompts(opt, math.ceil(opt.over_provision * opt.groups) * opt.steps + opt.groups)
    modes = {"sync": _mode(model, opt, partial=False, over_provision=1.0),
             "april": _mode(model, opt, partial=True, over_provision=opt.over_provision)}
    iters = {name: iter(prompts) for name in modes}
    truncated = {name: 0 for name in modes}  # returned samples that hit max_new_tokens
    with torch.no_grad():
        for step in range(opt.steps):
            for name, m in modes.items():  # interleaved: load drifts hit both modes
                for group in _one_step(m, iters[name], opt, device):
                    truncated[name] += sum(x.finish_reason == "length" for x in group)
            if not opt.json:
                print(f"step {step}: " + "  ".join(
                    f"{n} {m['steps'][-1]['wall_s']:.2f}s util={m['steps'][-1]['slot_utilisation']:.2f}"
                    for n, m in modes.items()), file=sys.stderr)
    out = {name: _summary(m, truncated[name]) for name, m in modes.items()}
    report = {
        "benchmark": "rollout",
        "what": "APRIL partial rollouts (over-provision, stop at N groups, park and resume) vs synchronous "
                "rollout, same engine / model / slots / prompts, long-tail (Pareto) response lengths",
        "config": {k: v for k, v in vars(opt).items() if k != "json"},
        "device": str(device),
        "sync": out["sync"],
        "april": out["april"],
        "speedup": out["april"]["useful_tokens_per_s"] / out["sync"]["useful_tokens_per_s"],
        "speedup_per_engine_step": (out["april"]["trained_tokens_per_engine_step"]
                                    / out["sync"]["trained_tokens_per_engine_step"]),
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    run(sys.argv[1:])
