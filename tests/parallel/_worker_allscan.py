"""Multi-process checks of sequence-parallel GLA; run by test_parallel_allscan.py.

    python tests/parallel/_worker_allscan.py OUT.json

Starts 4 gloo processes. Each case is run on the whole group (P = 4) and, at
the same time, on the two sub-groups {0, 1} and {2, 3} (P = 2, and group ranks
that differ from global ranks). Every rank also computes the single-process
result on the full sequence and records the largest differences of outputs and
gradients; rank 0 writes all records to OUT.json for the test to judge.
"""
import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longrl.models.gla import GLAConfig, GLAForCausalLM, GLAttention, gla_chunked
from longrl.parallel.allscan import CommCounter
from longrl.parallel.gla_sp import GLASequenceParallel, gla_sequence_parallel, shard_sequence
from longrl.parallel.local_spawn import spawn_local

B, H, K, V = 2, 2, 6, 3
# (full length T, SP chunk size, All-Scan blocks); T = 13 is not divisible by P
FUNCTION_CASES = [(16, 4, 1), (16, 3, 2), (13, 2, 3), (13, 16, 8)]


def _max_err(a, b):
    return (a - b).abs().max().item() if a.numel() else 0.0


def function_case(group, dtype, T, chunk, blocks, method):
    """Raw GLA math, with a global initial state and a loss on the final state."""
    P, rank = dist.get_world_size(group), dist.get_rank(group)
    gen = torch.Generator().manual_seed(T * 100 + chunk)  # same data on every rank
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)
    q, k, v, g = rnd(B, H, T, K), rnd(B, H, T, K), rnd(B, H, T, V), F.logsigmoid(rnd(B, H, T, K))
    s0, w, wf = rnd(B, H, K, V), rnd(B, H, T, V), rnd(B, H, K, V)
    ref = [x.clone().requires_grad_() for x in (q, k, v, g, s0)]
    o_ref, f_ref = gla_chunked(*ref[:4], chunk_size=5, initial_state=ref[4])
    ((o_ref * w).sum() + (f_ref * wf).sum()).backward()

    shard = lambda x: shard_sequence(x, group, dim=2)[0]
    valid = shard_sequence(q, group, dim=2)[1]  # [T_shard]
    mask = valid[:, None].to(dtype)  # padded tokens: k = 0, g = 0
    leaves = [shard(x).clone().requires_grad_() for x in (q, k, v, g)]
    s0_leaf = s0.clone().requires_grad_()
    counter = CommCounter()
    o, final = gla_sequence_parallel(leaves[0], leaves[1] * mask, leaves[2], leaves[3] * mask, group, method=method,
                                     num_blocks=blocks, chunk_size=chunk, initial_state=s0_leaf, counter=counter)
    last = rank == P - 1
    loss = (o * shard(w)).sum() + ((final * wf).sum() if last else 0.0)
    loss.backward()
    errs = {"out": _max_err(o[:, :, valid], shard(o_ref.detach())[:, :, valid])}
    for name, leaf, r in zip("qkvg", leaves, ref):
        errs[f"grad_{name}"] = _max_err(leaf.grad[:, :, valid], shard(r.grad)[:, :, valid])
    if last:
        errs["final"] = _max_err(final, f_ref)
    if rank == 0:
        errs["grad_s0"] = _max_err(s0_leaf.grad, ref[4].grad)
    state_bytes = B * H * K * V * torch.tensor([], dtype=dtype).element_size()
    return dict(kind="function", P=P, rank=rank, dtype=str(dtype), T=T, chunk=chunk, blocks=blocks, method=method,
                errs=errs, bytes=counter.bytes_sent, state_bytes=state_bytes, decay_bytes=state_bytes // V)


def _param_grad_errs(model, ref_model, group):
    errs = {}
    for (name, p), (_, p_ref) in zip(model.named_parameters(), ref_model.named_parameters()):
        grad = p.grad.clone()
        dist.all_reduce(grad, group=group)  # each rank holds its shard's share
        errs[f"grad_{name}"] = _max_err(grad, p_ref.grad)
    return errs


def layer_case(group, dtype, method):
    """GLAttention with projections, padding mask and parameter gradients; T = 11."""
    T, D = 11, 8
    torch.manual_seed(1)
    ref_layer = GLAttention(D, num_heads=2, chunk_size=4).to(dtype)
    layer = GLAttention(D, num_heads=2, chunk_size=3).to(dtype)
    layer.load_state_dict(ref_layer.state_dict())
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(B, T, D, generator=gen, dtype=dtype), torch.randn(B, T, D, generator=gen, dtype=dtype)
    x_ref = x.clone().requires_grad_()
    y_ref = ref_layer(x_ref)
    (y_ref * w).sum().backward()

    x_shard, valid = shard_sequence(x, group, dim=1)
    x_leaf = x_shard.clone().requires_grad_()
    y = layer(x_leaf, sp=GLASequenceParallel(group, method, num_blocks=2), valid=valid)
    (y * shard_sequence(w, group, dim=1)[0]).sum().backward()
    errs = {"out": _max_err(y[:, valid], shard_sequence(y_ref.detach(), group, 1)[0][:, valid]),
            "grad_x": _max_err(x_leaf.grad[:, valid], shard_sequence(x_ref.grad, group, 1)[0][:, valid])}
    errs.update(_param_grad_errs(layer, ref_layer, group))
    return dict(kind="layer", P=dist.get_world_size(group), rank=dist.get_rank(group), dtype=str(dtype),
                method=method, errs=errs)


def model_case(group, method, window=0):
    """Two-layer GLA language model (tied embeddings): logits and every parameter gradient.
    window > 0: the hybrid, layer 2 sliding-window softmax attention over `window` tokens
    (window - 1 > the shard length at P = 4 reaches back over two ranks)."""
    T = 10
    torch.manual_seed(3)
    cfg = GLAConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2, mlp_hidden=24, chunk_size=4,
                    softmax_every=2 if window else 0, window=window or 64)
    ref_model = GLAForCausalLM(cfg).double()
    model = GLAForCausalLM(cfg).double()
    model.load_state_dict(ref_model.state_dict())
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
    w = torch.randn(B, T, cfg.vocab_size, generator=gen, dtype=torch.float64)
    logits_ref = ref_model(ids)
    (logits_ref * w).sum().backward()
    ids_shard, valid = shard_sequence(ids, group, dim=1)
    logits = model(ids_shard, sp=GLASequenceParallel(group, method, num_blocks=3), valid=valid)
    (logits * shard_sequence(w, group, dim=1)[0]).sum().backward()
    errs = {"out": _max_err(logits[:, valid], shard_sequence(logits_ref.detach(), group, 1)[0][:, valid])}
    errs.update(_param_grad_errs(model, ref_model, group))
    return dict(kind="hybrid" if window else "model", P=dist.get_world_size(group), rank=dist.get_rank(group),
                dtype="torch.float64", method=method, window=window, errs=errs)


def run(rank, world, out_path):
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # every rank creates every group
    records = []
    for group in (None, pairs[rank // 2]):
        for method in ("allscan", "lasp2"):
            for dtype in (torch.float64, torch.float32):
                for T, chunk, blocks in FUNCTION_CASES:
                    records.append(function_case(group, dtype, T, chunk, blocks, method))
                records.append(layer_case(group, dtype, method))
            records.append(model_case(group, method))
            for window in (3, 5):
                records.append(model_case(group, method, window))
    gathered = [None] * world
    dist.all_gather_object(gathered, records)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump([r for rs in gathered for r in rs], f)


if __name__ == "__main__":
    spawn_local(run, 4, sys.argv[1], start_method="fork")
