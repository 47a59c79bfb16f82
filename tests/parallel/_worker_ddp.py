"""Data-parallel checks in 2 processes; run by test_parallel_ddp.py.

    python tests/parallel/_worker_ddp.py OUT.json            # forks 2 ranks with torchrun's variables
    torchrun --nproc_per_node 2 tests/parallel/_worker_ddp.py OUT.json   # the same under torchrun

The forked ranks get RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT
exactly as torchrun sets them, and join through `init_from_env` (env://), but
import torch and transformers once instead of once per rank.

Each rank trains on its own rows of one step batch (uneven response lengths),
divides by the GLOBAL loss normaliser and sums gradients over ranks; every rank
also runs the single process on the whole batch, and rank 0 writes the largest
differences to OUT.json for the test to judge. Errors are relative to the
reference's largest magnitude (at least 1).
"""
import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import Qwen2Config, Qwen2ForCausalLM

from longrl.parallel import dist as ddist
from longrl.parallel.local_spawn import free_port
from longrl.rl.losses import LOSS_AGGS, loss_normalizer, policy_loss
from longrl.streambp.logprobs import loss_and_backward, make_batch, sequence_logprobs

VOCAB = 40
# six sequences of very different lengths; rank 0 gets rows 0-2 (short), rank 1 rows 3-5 (long)
PROMPT_LENS = [3, 2, 4, 3, 5, 2]
RESPONSE_LENS = [2, 4, 1, 9, 7, 11]


def _err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1)).item()


def _model(tie=True):
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    return Qwen2ForCausalLM(cfg).double()


def _data():
    gen = torch.Generator().manual_seed(1)
    tok = lambda n: torch.randint(1, VOCAB, (n,), generator=gen).tolist()
    prompts, responses = [tok(n) for n in PROMPT_LENS], [tok(n) for n in RESPONSE_LENS]
    batch = make_batch(prompts, responses, pad_id=0)  # [6, 16]
    noise = 0.3 * torch.randn(batch.mask.shape, generator=gen, dtype=torch.float64)  # [6, 16]
    adv = torch.randn(len(prompts), generator=gen, dtype=torch.float64)  # [6]
    return batch, noise, adv


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _step(model, batch, old, adv, normalizer, loss_agg, kind, micro):
    """Gradient accumulation over micro-batches of `micro` rows, as the GRPO recipe does."""
    total = 0.0
    for s in range(0, batch.input_ids.shape[0], micro):
        rows = torch.arange(s, min(s + micro, batch.input_ids.shape[0]))
        mb = batch[rows]
        width = mb.input_ids.shape[1]

        def loss_fn(logp, mb=mb, rows=rows, width=width):
            return policy_loss(logp, old[rows][:, :width], adv[rows], mb.mask, normalizer=normalizer,
                               loss_agg=loss_agg, kind=kind)

        loss, _, _ = loss_and_backward(model, mb, loss_fn, mode="chunked", chunk=4)
        total += float(loss)
    return total


def dp_case(rank, world, loss_agg, kind, tie=True, drop_rank1_tokens=False):
    """One optimizer step's gradient: 2 ranks x half the batch == 1 process x whole batch."""
    batch, noise, adv = _data()
    if drop_rank1_tokens:  # rank 1's rows train nothing: its (untied) LM head gets no .grad
        batch.mask[3:] = 0.0
    ref = _model(tie)
    old = (sequence_logprobs(ref, batch, chunk=8) + noise) * batch.mask  # [6, 16]
    loss_ref = _step(ref, batch, old, adv, loss_normalizer(batch.mask, loss_agg), loss_agg, kind, micro=6)
    g_ref = _grads(ref)

    model = _model(tie)
    mine = torch.tensor(ddist.shard_indices(6, rank, world))  # contiguous: rows 0-2 or 3-5
    local = batch[mine]
    normalizer = ddist.global_loss_normalizer(local.mask, loss_agg)
    loss = _step(model, local, old[mine][:, : local.input_ids.shape[1]], adv[mine], normalizer, loss_agg, kind, micro=2)
    ddist.all_reduce_gradients(model)
    errs = {"loss": _err(torch.tensor(ddist.all_reduce_sum(loss)), torch.tensor(loss_ref))}
    g = _grads(model)
    assert g.keys() == g_ref.keys(), (sorted(g), sorted(g_ref))
    errs.update({f"grad_{n}": _err(g[n], g_ref[n]) for n in g_ref})
    return dict(kind="dp", rank=rank, loss_agg=loss_agg, loss_kind=kind, tie=tie, dropped=drop_rank1_tokens,
                errs=errs, normalizer=normalizer, local_normalizer=loss_normalizer(local.mask, loss_agg))


def ddp_case(rank, world):
    """The same step through DistributedDataParallel (standard full-logits path) with the
    summing comm hook instead of DDP's mean."""
    batch, noise, adv = _data()
    loss_agg = "token-mean"
    ref = _model()
    old = (sequence_logprobs(ref, batch, chunk=8) + noise) * batch.mask
    _step(ref, batch, old, adv, loss_normalizer(batch.mask, loss_agg), loss_agg, "ppo", micro=6)
    g_ref = _grads(ref)

    model = _model()
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ddp.register_comm_hook(None, ddist.sum_comm_hook)
    mine = torch.tensor(ddist.shard_indices(6, rank, world))
    mb = batch[mine]
    logits = ddp(input_ids=mb.input_ids, use_cache=False).logits  # [3, T, V]
    logp = torch.log_softmax(logits, -1).gather(-1, mb.targets[..., None]).squeeze(-1)  # [3, T]
    loss, _ = policy_loss(logp, old[mine][:, : mb.input_ids.shape[1]], adv[mine], mb.mask,
                          normalizer=ddist.global_loss_normalizer(mb.mask, loss_agg), loss_agg=loss_agg)
    loss.backward()
    g = _grads(model)
    return dict(kind="ddp", rank=rank, errs={f"grad_{n}": _err(g[n], g_ref[n]) for n in g_ref})


def helpers_case(ctx):
    """init_from_env's context, reductions and broadcast."""
    t = torch.tensor([1.0, 2.0]) * (ctx.rank + 1)
    out = ddist.all_reduce_sum(t)
    return dict(kind="helpers", rank=ctx.rank, world=ctx.world, local_rank=ctx.local_rank, backend=ctx.backend,
                is_main=ddist.is_main(), rank_fn=ddist.rank(), world_fn=ddist.world(),
                sum_float=ddist.all_reduce_sum(0.5 + ctx.rank), sum_tensor=out.tolist(), input_kept=t.tolist(),
                broadcast=ddist.broadcast_object({"seed": 7} if ctx.rank == 0 else None),
                again=ddist.init_from_env() == ctx)


def main(out_path):
    ctx = ddist.init_from_env()
    torch.set_num_threads(1)
    records = [helpers_case(ctx)]
    for loss_agg in LOSS_AGGS:
        records.append(dp_case(ctx.rank, ctx.world, loss_agg, "ppo"))
    records.append(dp_case(ctx.rank, ctx.world, "seq-mean-token-mean", "gspo"))
    records.append(dp_case(ctx.rank, ctx.world, "token-mean", "ppo", tie=False, drop_rank1_tokens=True))
    records.append(ddp_case(ctx.rank, ctx.world))
    ddist.barrier()
    gathered = [None] * ctx.world
    dist.all_gather_object(gathered, records)
    if ctx.is_main:
        with open(out_path, "w") as f:
            json.dump([r for rs in gathered for r in rs], f)
    dist.destroy_process_group()


def _forked_rank(rank, world, port, out_path):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    main(out_path)


if __name__ == "__main__":
    if "WORLD_SIZE" in os.environ:  # started by torchrun
        main(sys.argv[1])
    else:
        torch.multiprocessing.start_processes(_forked_rank, args=(2, free_port(), sys.argv[1]), nprocs=2,
                                              start_method="fork")
