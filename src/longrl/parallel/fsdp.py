"""FSDP2 (`parallel.fsdp=true`): parameters, gradients and AdamW state sharded over the data-parallel ranks.

Each decoder layer and then the root are wrapped with `torch.distributed.fsdp.fully_shard`
over the data-parallel mesh (with sequence parallelism, the ranks with the same SP rank:
`dist.layout().dp_group`). The optimizer holds the sharded parameters (DTensors, each rank
1/P of the rows of every tensor), so fp32 master weights, reduced gradients and AdamW's
moments take 1/P of the memory per rank; `checkpoint.py` saves them with DCP.

Where this departs from FSDP's usual per-layer gathering, and why:

    sharded at rest --gather()--> full weights for the whole step's compute --shard_grads()-->
    sharded grads -> optimizer step on the shards -> gather() again

FSDP's forward/backward hooks all-gather a layer's weights when it runs and reduce-scatter
its gradients when its backward ends: every rank must run the same layers the same number
of times, in the same order. longrl's ranks do not: rollouts generate responses of
different lengths, data-parallel shares of a GRPO step hold different numbers of
micro-batches (or none), and StreamBP and the chunked head call a layer's projections and
the LM head's weight directly, past the hooks. So the weights are gathered ONCE per
optimizer step (`gather`: `unshard()` on every FSDP module, with resharding and gradient
sync turned off) and everything between two optimizer steps (rollouts, old/reference
log-probs, every micro-batch's backward) runs on full weights with no collective; the
native engines read the same gathered tensors (no second copy). The step's gradients
then accumulate in full on each rank, and `shard_grads` (called by
`dist.all_reduce_gradients`) sums them with reduce-scatters (per dtype, in 64 MiB buckets) over the DP
group (plus an all-reduce over the SP group, whose ranks hold the gradients of different
positions) into the shards, and reshards the model for the optimizer step.

The price: during a step each rank holds the full parameters and the full gradients on
top of its shards, i.e. (1 + 1/P) x params + grads, like plain data parallelism; what is
saved is the optimizer state and master weights (1/P each), and everything at rest
(checkpoints, `parallel.fsdp_offload`, which keeps the shards and the optimizer in host
memory). `bench/fsdp.py` measures both figures.

Video-language models (Qwen2.5-VL, `policy/video.py`): the language model's decoder layers
are the units; the vision tower is sharded with the root (its weights, frozen or trainable,
are 1/P per rank at rest and gathered with the rest for the step, so the once-per-step
encode and the cached embeddings run on full weights with no collective; a trainable
tower's gradients are reduce-scattered with the others). Code reading a sharded model's
weights must not call `state_dict()` on it or on a submodule between steps: FSDP2's
state-dict hooks reshard it (`models.vlm.vision_tag` reads `named_parameters()`).

LoRA (`model.lora.r`): peft injects the adapter before sharding, so the adapter weights are
sharded with their layers (frozen base weights too; AdamW holds only the adapter's shards);
the KL/DPO reference is the disabled adapter, as without FSDP. A phase change (SFT -> RL, a
DPO round) folds the update into the base shards in place (`models.lora`, `write_rows`,
`reshard_and_gather`, `set_trainable`).

Not supported (refused by `config.Config.validate`): ZeRO-1 on top (FSDP2 already shards the
optimizer). The vLLM backend takes the gathered weights (`replica(clone=False)`)
at its start and at every sync, so each rank's engine holds one whole copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as tdist
from torch import nn

from longrl.errors import UserError
from longrl.parallel import dist

_ATTR = dist.SHARDING_ATTR


@dataclass
class _Sharding:
    """What `shard_model` attaches to the model."""

    sharded: dict[str, nn.Parameter]  # name -> sharded DTensor parameter (the optimizer's)
    modules: list  # the FSDP modules, root first (the same order on every rank)
    dp_group: object  # the process group the shards are spread over

    def shard_grads(self, model, average: bool = False) -> None:
        """`shard_grads(model)`: how `dist.all_reduce_gradients` reaches it without an import cycle."""
        shard_grads(model, average)


def check_world(world: int | None) -> None:
    """UserError without torchrun (`world` None: no process group to shard over). The
    combinations FSDP2 refuses are checked with the config (`config._check_fsdp`)."""
    if world is None:
        raise UserError("parallel.fsdp=true shards over torchrun processes; launch with torchrun, e.g. "
                        "`torchrun --nproc-per-node 2 -m longrl train parallel.fsdp=true` (--nproc-per-node 1 also runs)")


def is_sharded(model) -> bool:
    return getattr(model, _ATTR, None) is not None


def _mesh_and_group():
    """A 1-D device mesh over this rank's data-parallel group."""
    from torch.distributed.device_mesh import DeviceMesh

    lay = dist.layout()
    group = lay.dp_group if lay.dp_group is not None else tdist.group.WORLD
    device_type = "cuda" if tdist.get_backend(group) == "nccl" else "cpu"
    return DeviceMesh.from_group(group, device_type), group


def shard_model(model: nn.Module, offload: bool = False, mp_policy=None) -> nn.Module:
    """`fully_shard` each decoder layer, then the root, over the DP mesh; returns the same
    module, gathered (ready to generate and train). Collective: every rank calls it with
    the same model. `offload`: FSDP's CPUOffloadPolicy (shards and optimizer step in host
    memory). `mp_policy`: an FSDP MixedPrecisionPolicy (e.g. bf16 compute, fp32 shards)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard

    mesh, group = _mesh_and_group()
    kwargs = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    if offload:
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for layer in _decoder_layers(model):  # a video model's language model's layers; its tower goes with the root
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in modules:  # the step's compute runs on gathered weights with no collective (module docstring)
        m.set_reshard_after_forward(False, recurse=False)
        m.set_reshard_after_backward(False, recurse=False)
        m.set_requires_gradient_sync(False, recurse=False)
    setattr(model, _ATTR, _Sharding(dict(model.named_parameters()), modules, group))
    gather(model)
    return model


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    from longrl.streambp.layers import decoder_body

    try:
        return list(decoder_body(model).layers)
    except (AttributeError, TypeError, ValueError):
        return []  # a model without the usual body: the root alone is sharded


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer steps: the shards under FSDP (whatever the model's
    current state), the module's own parameters otherwise."""
    state = getattr(model, _ATTR, None)
    params = state.sharded.values() if state is not None else model.parameters()
    return [p for p in params if p.requires_grad]


def gather(model: nn.Module) -> None:
    """All-gather the full weights into every FSDP module (collective; a no-op if gathered:
    `unshard` skips a module whose weights are already full, and every rank is in the same
    state)."""
    for m in getattr(model, _ATTR).modules:
        m.unshard()


def is_gathered(model: nn.Module) -> bool:
    """Whether the module holds full weights now. Read from the parameters themselves, as
    FSDP also reshards behind our back (`state_dict()` does)."""
    from torch.distributed.tensor import DTensor

    return not any(isinstance(p, DTensor) for p in model.parameters())


def shard_grads(model: nn.Module, average: bool = False) -> None:
    """Sum the full gradients every rank accumulated since `gather` into the shards' .grad
    and reshard the model (collective; a no-op if already sharded). One reduce-scatter per
    dtype and bucket of BUCKET_ELEMENTS over the DP group; with SP, an all-reduce of the shards over the SP group. A
    parameter whose gradient is None on every rank keeps a None .grad (as in one process:
    AdamW skips it); None on some ranks counts as zeros. `average`: divide by the world."""
    state = getattr(model, _ATTR)
    if not is_gathered(model):
        return
    full = dict(model.named_parameters())  # the gathered tensors, under the shards' names
    names = [n for n, p in state.sharded.items() if p.requires_grad]
    present = torch.tensor([full[n].grad is not None for n in names], dtype=torch.int32,
                           device=dist.comm_device(state.dp_group))
    if dist.world() > 1:
        tdist.all_reduce(present)
    names = [n for n, k in zip(names, present.tolist()) if k > 0]
    by_dtype: dict[torch.dtype, list[str]] = {}
    for n in names:
        by_dtype.setdefault(state.sharded[n].dtype, []).append(n)
    for ns in by_dtype.values():
        for bucket in _buckets(ns, full, dist.world(state.dp_group)):
            _reduce_scatter(bucket, full, state, average)
    for p in full.values():
        p.grad = None
    for m in state.modules:
        m.reshard()


BUCKET_ELEMENTS = 1 << 24
"""Elements of one reduce-scatter buffer ([P, widths], 64 MiB in fp32; a larger tensor gets
a buffer of its own): the step's full gradients are freed bucket by bucket as they are
copied in, so the buffers add at most this much on top of them, not a second full copy."""


def _buckets(names: list[str], full: dict, P: int) -> list[list[str]]:
    """`names` in order, cut into runs whose padded [P, rows * row size] buffers stay
    within BUCKET_ELEMENTS (a tensor larger than that alone)."""
    out, size = [[]], 0
    for n in names:
        t = full[n]
        padded = P * -(-t.shape[0] // P) * (t[0].numel() if t.dim() else 1)
        if out[-1] and size + padded > BUCKET_ELEMENTS:
            out.append([])
            size = 0
        out[-1].append(n)
        size += padded
    return [b for b in out if b]


def _reduce_scatter(names: list[str], full: dict, state: _Sharding, average: bool) -> None:
    """One flat reduce-scatter for a bucket of parameters of one dtype (`_buckets`): rank
    r's slice of the buffer is the rows fully_shard gave rank r of every tensor (torch.chunk
    on dim 0: ceil(n/P) rows each, the last ranks fewer or none), zero-padded to equal
    blocks. Each full gradient is freed as soon as it is copied in."""
    from torch.distributed.tensor import DTensor

    P = dist.world(state.dp_group)
    device = dist.comm_device(state.dp_group)
    dtype = state.sharded[names[0]].dtype
    shapes = [(-(-full[n].shape[0] // P), full[n][0].numel()) for n in names]  # (rows per rank, row size)
    widths = [rows * rest for rows, rest in shapes]
    flat = torch.zeros(P, sum(widths), dtype=dtype, device=device)  # [P, sum of widths]
    offset = 0
    for n, (rows, rest), w in zip(names, shapes, widths):
        p = full[n]
        if p.grad is not None:
            g = p.grad.detach().reshape(p.shape[0], rest)  # [n0, rest]
            for k in range(P):
                part = g[k * rows:(k + 1) * rows]  # [<= rows, rest]; empty past the end
                flat[k, offset:offset + part.numel()] = part.reshape(-1)
            p.grad = None
        offset += w
    mine = torch.empty(flat.shape[1], dtype=dtype, device=device)
    if P > 1:
        tdist.reduce_scatter_single(mine, flat.reshape(-1), group=state.dp_group)
    else:
        mine.copy_(flat[0])
    del flat
    lay = dist.layout()
    if lay.sp_size > 1:  # an SP group's ranks share a DP rank (the same shard) and hold different positions
        tdist.all_reduce(mine, group=lay.sp_group)
    if average:
        mine /= dist.world()
    for n, chunk, (rows, rest) in zip(names, mine.split(widths), shapes):
        shard = state.sharded[n]
        local = shard.to_local()
        g = chunk.view(rows, rest)[:local.shape[0]].to(local.device).reshape(local.shape)
        shard.grad = DTensor.from_local(g.contiguous(), shard.device_mesh, shard.placements, run_check=False,
                                        shape=shard.shape, stride=shard.stride())


def grad_norm_and_clip(model: nn.Module, max_norm: float) -> float:
    """The global gradient norm over the shards (one all-reduce inside DTensor), clipped
    to `max_norm` (inf: measure only). The model must be sharded (after `shard_grads`)."""
    params = [p for p in trainable_parameters(model) if p.grad is not None]
    if not params:
        return 0.0
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def sharded_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The sharded (DTensor) parameters by name: what the optimizer steps and DCP saves."""
    return dict(getattr(model, _ATTR).sharded)


def write_rows(shard, full: torch.Tensor, add: bool = False) -> None:
    """Set (or `add` to) this rank's rows of the sharded parameter `shard` from the full
    tensor `full` (the same on every rank): fully_shard gives rank r rows r*ceil(n/P) on
    (torch.chunk on dim 0), the last ranks fewer or none. No collective; `reshard_and_gather`
    afterwards makes the gathered weights follow."""
    local = shard.to_local()
    if local.shape[0] == 0:
        return
    rows = -(-full.shape[0] // shard.device_mesh.size())
    start = shard.device_mesh.get_local_rank() * rows
    part = full[start:start + local.shape[0]].to(device=local.device, dtype=local.dtype)
    with torch.no_grad():
        local.add_(part) if add else local.copy_(part)


def reshard_and_gather(model: nn.Module) -> None:
    """Drop the gathered weights and all-gather them afresh from the shards (collective):
    after the shards were written (`write_rows`)."""
    state = getattr(model, _ATTR)
    for m in state.modules:
        m.reshard()
    gather(model)


def set_trainable(model: nn.Module, trainable) -> None:
    """`requires_grad` of each parameter, sharded and gathered alike, to `trainable(name)`
    (the optimizer reads the shards' flag, autograd the gathered tensors')."""
    state = getattr(model, _ATTR)
    for name, p in state.sharded.items():
        p.requires_grad_(trainable(name))
    for name, p in model.named_parameters():
        p.requires_grad_(trainable(name))


def full_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of a gathered model, full, by name (no collective; shares
    storage with the model until the next reshard)."""
    return {**{n: p.detach() for n, p in model.named_parameters(remove_duplicate=False)},
            **{n: b for n, b in model.named_buffers()}}


def replica(model: nn.Module, clone: bool = True) -> nn.Module:
    """A plain module (no FSDP) with `model`'s current weights: the frozen KL/DPO reference
    (`clone=True`, its own memory: a second full copy, as without FSDP), or a view for
    saving in Hugging Face format (`clone=False`: shares the gathered tensors; use it at
    once). A plain model gives `copy.deepcopy(model)` / itself."""
    import copy

    if not is_sharded(model):
        return copy.deepcopy(model) if clone else model
    gather(model)
    base = next(c for c in type(model).__mro__ if c.__module__.split(".")[0] != "torch" and
                not c.__name__.startswith("FSDP"))
    with torch.device("meta"):
        out = base(model.config) if hasattr(model, "config") else None
    if out is None:
        raise TypeError(f"cannot rebuild a {base.__name__} without a config")
    src = dict(model.named_modules())
    seen: dict[int, nn.Parameter] = {}
    for name, mod in out.named_modules():
        orig = src[name]
        if type(orig) is not type(mod) and not type(orig).__name__.startswith("FSDP"):
            mod.__class__ = type(orig)  # a class swapped after loading (e.g. models.precision's autocast linears)
        for k, p in orig._parameters.items():
            if p is not None and id(p) not in seen:  # tied weights stay tied
                seen[id(p)] = nn.Parameter(p.detach().clone() if clone else p.detach(), requires_grad=p.requires_grad)
            if p is not None:
                mod._parameters[k] = seen[id(p)]
        for k, b in orig._buffers.items():
            if b is not None:
                mod._buffers[k] = b.clone() if clone else b
        for k, v in vars(orig).items():  # plain tensor attributes (e.g. rotary's original_inv_freq)
            if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter):
                setattr(mod, k, v.clone() if clone else v)
    return out
