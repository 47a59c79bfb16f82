"""bf16 mixed precision without FSDP (`train.dtype=bfloat16`): bf16 compute, fp32 master weights.

The weights, their gradients and AdamW's moments stay in `model.dtype` (float32); every
linear layer inside the decoder layers runs under `torch.autocast(dtype=bfloat16)`, which
casts its weight and input to bf16 for the matmul, and hands the product on in the
input's dtype (fp32). Only the matmuls of the projections run in bf16: the embedding, the
norms, rotary embeddings, attention, the final norm and the LM head stay fp32, so the
residual stream is fp32 and the log-probs, the log-softmax over the vocabulary and every
loss are computed in fp32 from the fp32 head weights (bf16 logits would carry errors of
~1e-2 per token into importance ratios and KL terms). Departure from "autocast the whole
forward": attention scores stay fp32 too (its q, k, v must share one dtype on every path);
the projections and MLP hold most of the FLOPs.

Why the linear layers and not whole decoder layers: StreamBP's chunked layer backward
re-runs a layer piece by piece (its projections, its MLP), never through the layer's own
forward; every path calls the projections. The autocast is attached to the module's class
(a subclass per type whose `forward` enters autocast), not to a closure over the object,
so a `copy.deepcopy` of the model (GRPO's frozen reference) keeps it without pointing back
at the original. LoRA's adapter layers (`models.lora`) get it too, also a fresh adapter of a
later phase. FSDP2 (another module) gets the same numerics from its `MixedPrecisionPolicy`.
"""

from __future__ import annotations

import torch

from longrl.errors import UserError

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_SUBCLASSES: dict[tuple[type, torch.dtype], type] = {}


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's stack(s) of decoder layers: every `nn.ModuleList` named `layers`."""
    return [layer for name, m in model.named_modules()
            if isinstance(m, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers" for layer in m]


def _linears(model) -> list[torch.nn.Linear]:
    return [m for layer in decoder_layers(model) for m in layer.modules() if isinstance(m, torch.nn.Linear)]


def set_compute_dtype(model, dtype: str) -> torch.nn.Module:
    """Run the linear layers of `model`'s decoder layers in `dtype` ('float32': as they are;
    'bfloat16': under autocast); the parameters keep their own dtype. Returns the model."""
    if dtype == "float32":
        return model
    linears = _linears(model)
    if not linears:
        raise UserError(f"train.dtype={dtype}: found no decoder layers (a ModuleList named 'layers') with linear "
                        f"layers in {type(model).__name__}; use train.dtype=float32")
    for m in linears:
        m.__class__ = _autocast_class(type(m), COMPUTE_DTYPES[dtype])
    return model


def compute_dtype(model) -> torch.dtype | None:
    """The autocast dtype `set_compute_dtype` gave the layers (None: they run as they are)."""
    for m in _linears(model):
        dtype = getattr(type(m), "longrl_compute_dtype", None)
        if dtype is not None:
            return dtype
    return None


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in COMPUTE_DTYPES.items() if v == dtype)


def _autocast_class(cls: type, dtype: torch.dtype) -> type:
    if getattr(cls, "longrl_compute_dtype", None) is not None:  # already wrapped
        cls = cls.__mro__[1]
    key = (cls, dtype)
    if key not in _SUBCLASSES:
        def forward(self, x, *args, **kwargs):
            with torch.autocast(device_type=self.weight.device.type, dtype=dtype):
                y = cls.forward(self, x, *args, **kwargs)
            return y.to(x.dtype)  # the bf16 product, handed on in the caller's dtype

        _SUBCLASSES[key] = type(cls.__name__, (cls,), {"forward": forward, "longrl_compute_dtype": dtype,
                                                       "__module__": cls.__module__,
                                                       "__qualname__": cls.__qualname__})
    return _SUBCLASSES[key]
