"""FSDP2 with LoRA adapters inside the recipes; run by test_parallel_fsdp_lora.py.

    python tests/parallel/_worker_fsdp_lora.py OUT.json

The text cases of `_worker_sp_recipes.py` (one SFT step in three backprop/dtype settings
and with StreamBP, one GRPO step with two PPO epochs, micro-batches, KL against the
disabled adapter and uneven lengths, one online-DPO step, greedy rollouts) on a model with
a LoRA adapter (r=4 on every linear layer, B drawn at random so every adapter weight gets a
gradient): the parent runs them as ONE plain process (the reference), then 2 forked ranks
run them with the adapted model wrapped by `parallel.fsdp.shard_model`. Each rank also
runs the phase change in place under FSDP2 (`models.lora.new_adapter` / `merge_adapter`:
the update folded into the base shards, a fresh adapter) and records what it found. The
ranks reduce-scatter their gradients in buckets of 300 elements, so a step takes many.
"""
import sys

import torch
import torch.distributed as tdist

import _worker_sp_recipes as sp
from _worker_fsdp import _record_full_grads
from longrl.config import LoRAConfig
from longrl.models import lora
from longrl.parallel import dist, fsdp
from longrl.parallel.local_spawn import free_port

LORA = LoRAConfig(r=4, alpha=8.0)
STREAMBP = ("streambp", torch.float64)
_plain_model = sp._model


def _lora_model(dtype, tie=True):
    """The test model with an adapter whose A (peft's draw after the model's seed) and B
    (random, not zero) are the same in every process."""
    model = lora.apply_lora(_plain_model(dtype, tie), LORA)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.2)
    return model


def _sharded_lora_model(dtype, tie=True):
    return fsdp.shard_model(_lora_model(dtype, tie))


def fold_case():
    """The phase change under FSDP2, compared with one process's `merged_state_dict` and
    forward: -> a record of the largest differences and the flags found."""
    model = _sharded_lora_model(torch.float64)
    ids = torch.randint(6, 40, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want_logits = model(ids).logits
        want_base = lora.merged_state_dict(model)
        old_a = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
        with lora.DisabledAdapter(model) as off:
            adapter_effect = float((off(ids).logits - want_logits).abs().max())
    lora.new_adapter(model, LORA, base_moved=True)
    fsdp.reshard_and_gather(model)  # what was written lives in the shards, and the flags survive a regather
    with torch.no_grad():
        logits = model(ids).logits
    base = lora.base_state_dict(model)
    params = dict(model.named_parameters())
    a_sums = torch.tensor([float(params[n].detach().sum()) for n in sorted(old_a)], dtype=torch.float64)
    a_all = [torch.zeros_like(a_sums) for _ in range(dist.world())]
    tdist.all_gather(a_all, a_sums)
    out = {
        "adapter_effect": adapter_effect,
        "base_err": max(float((base[k] - want_base[k]).abs().max()) for k in want_base),
        "logits_err": float((logits - want_logits).abs().max()),
        "b_zero": all(not p.any() for n, p in params.items() if "lora_B" in n),
        "a_redrawn": all(not torch.equal(params[n], a) for n, a in old_a.items()),
        "a_same_on_ranks": all(torch.equal(a, a_all[0]) for a in a_all),
        "adapters_train": all(p.requires_grad == ("lora_" in n) for n, p in params.items()),
        "shards_agree": all(p.requires_grad == ("lora_" in n) for n, p in fsdp.sharded_parameters(model).items()),
        "moved": lora.base_moved(model),
    }
    lora.merge_adapter(model)  # full training: the base trains, the adapter stays at B = 0
    fsdp.reshard_and_gather(model)
    with torch.no_grad():
        out["merge_logits_err"] = float((model(ids).logits - want_logits).abs().max())
    out["base_trains"] = all(p.requires_grad == ("lora_" not in n) for n, p in model.named_parameters())
    out["optimizer_params"] = len(fsdp.trainable_parameters(model))
    return out


def main(out_path, _):
    ctx = dist.init_from_env()
    lay = dist.setup_layout(1)
    torch.set_num_threads(1)
    fsdp.BUCKET_ELEMENTS = 300  # gradients reduce-scattered in many small buckets (the big-model path)
    base = dict(rank=ctx.rank, world=ctx.world, dp_rank=lay.dp_rank)
    records = []
    for mode, dtype in [*sp.SFT_CASES, STREAMBP]:
        got = sp.sft_case(mode, dtype)
        records.append(dict(base, kind="sft", mode=mode, dtype=str(dtype), errs=sp._compare(got, sp.REF["sft"][(mode, dtype)])))
    for case in sp.GRPO_CASES:
        records.append(dict(base, kind="grpo", loss=case[0], kl=case[2] > 0, clip_frac=sp.REF["grpo"][case]["clip_frac"],
                            errs=sp._compare(sp.grpo_case(*case), sp.REF["grpo"][case])))
    got = sp.dpo_case()
    records.append(dict(base, kind="dpo", pairs=got["pairs"], errs=sp._compare(got, sp.REF["dpo"])))
    roll = sp.rollout_case()
    want = sp._replica_rows(sp.REF["rollout"], sp.N_PROMPTS - 1)
    records.append(dict(base, kind="rollout", same=all(roll[k] == want[k] for k in ("prompt_ids", "response_ids", "ids"))))
    records.append(dict(base, kind="fold", **fold_case()))
    sp.write_records(records, ctx, out_path)


if __name__ == "__main__":
    out = sys.argv[1]
    torch.set_num_threads(1)  # before any kernel runs: the ranks are forked from this process
    sp._model = _lora_model
    sp.SFT_CASES.append(STREAMBP)  # the reference of the StreamBP case too
    sp.references()  # one plain process on the whole batch, the adapted model
    sp.SFT_CASES.remove(STREAMBP)
    sp._model, sp._record_grads = _sharded_lora_model, _record_full_grads  # the ranks inherit these (fork)
    torch.multiprocessing.start_processes(sp.forked_rank, args=(main, 2, free_port(), out, None), nprocs=2,
                                          start_method="fork")
