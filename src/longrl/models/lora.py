"""LoRA adapters through peft (`model.lora.r > 0`): train a low-rank update, keep the base frozen.

LoRA: Hu et al., arXiv 2106.09685. peft (`pip install -e ".[lora]"`) injects the adapter
layers into the Hugging Face model in place; the recipes keep training that same model
object (its decoder layers, head and config are where StreamBP and the rollout engines
expect them), and the `PeftModel` peft wraps around it is kept beside it, out of the module
tree, for what only it does: switching the adapter off and merging it.

Where this departs from a plain "LoRA run":
- Phases: every training phase trains a fresh adapter that is merged into the base when the
  phase ends (`new_adapter`): SFT's adapter is merged before RL starts, so the RL phase's
  base, and with it the KL/DPO reference (the base with the adapter disabled,
  `DisabledAdapter`: no second copy of the model), is the post-SFT policy, as without LoRA.
  Multi-round DPO (`rl.dpo_rounds`) merges once per round in the same way. With
  `model.lora.sft=false` SFT trains every weight and only RL trains adapters.
- Video-language models (Qwen2.5-VL): adapters on the language model only; the vision
  tower and its merger stay frozen and unadapted (`_vision_prefix`), so the cached video
  embeddings are the same with the adapter on and off (the reference's too), and
  merging leaves the tower's weights, and with them the embedding cache's key, as they
  were. A trainable tower with LoRA is refused (`config._check_lora_and_precision`).
- FSDP2 (`parallel.fsdp`): the adapter is injected before `fully_shard`, and the module tree
  is then fully_shard's, so a phase change cannot merge and unload. Under FSDP2 `new_adapter`
  folds W += s*B@A into the base shards and redraws the adapter in place (B = 0; A from one
  seed on every rank), and `merge_adapter` (full fine-tuning) folds, freezes the adapter at
  B = 0 (it adds exactly nothing) and unfreezes the base. Weights are read without
  `state_dict()` (`_state`): FSDP2's state-dict hooks would reshard the model. A resumed
  FSDP2 run takes base and adapter from the DCP shards, not from the files here.
- Rollouts: the native engines share the trainer's model, so they sample with the adapter
  active, which is the merged policy up to rounding; vLLM, which loads plain weights, gets
  the merged ones at every sync (`merged_state_dict`; vLLM's own LoRA serving is not used).
- Checkpoints: `model.safetensors` holds the merged weights (plain transformers loads the
  directory, no peft needed), `adapter/` the adapter in peft's format (also what an exact
  resume restores), and `lora_base.safetensors` the unmerged base when it is no longer
  step_0's weights (after a DPO round merged): merged weights minus the update is not
  the base bit for bit, so a resume takes the base from a file, never by subtraction.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from pathlib import Path

import torch

from longrl.errors import UserError
from longrl.models import precision

ADAPTER_DIR = "adapter"
"""Sub-directory of a checkpoint holding the adapter (peft's `save_pretrained` format)."""
BASE_FILE = "lora_base.safetensors"
"""The unmerged base weights, in a checkpoint whose base is not step_0's weights."""
_HANDLE = "_longrl_peft"  # attribute of the trained model holding its PeftModel (not a submodule)
_MOVED = "_longrl_base_moved"  # attribute: the base is not step_0's weights (a DPO round merged)
_FROZEN = "_longrl_frozen"  # attribute: names of the parameters that were frozen before the adapter came
_BASE = ".base_layer"  # peft's infix for a wrapped layer's own parameters


def require_peft():
    try:
        import peft
    except ImportError:
        raise UserError('model.lora.r > 0 needs peft: pip install -e ".[lora]" (or pip install "peft>=0.13")') from None
    return peft


def has_lora(model) -> bool:
    return _HANDLE in getattr(model, "__dict__", {})


def apply_lora(model, cfg, base_moved: bool = False) -> torch.nn.Module:
    """Inject a fresh adapter (`cfg`: a `LoRAConfig`) into `model` in place and return it;
    only the adapter trains. B starts at zero, so the model computes what it did before.
    `base_moved`: the base weights are no longer step_0's (checkpoints then save them)."""
    peft = require_peft()
    targets = cfg.target_modules
    targets = targets[0] if targets == ["all-linear"] else list(targets)
    # A causal-LM adapter where the model generates through transformers (so peft's own
    # loaders can rebuild it); a plain one for models that do not (the GLA model).
    task = "CAUSAL_LM" if hasattr(model, "prepare_inputs_for_generation") else None
    tower = _vision_prefix(model)
    exclude = None if tower is None else rf"(.*\.)?{re.escape(tower)}(\..*)?"  # regex: the tower and all below it
    config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                             exclude_modules=exclude, bias="none", task_type=task)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}  # restored by merge_adapter
    try:
        with warnings.catch_warnings():  # peft asks transformers a deprecated question (is_gradient_checkpointing)
            warnings.simplefilter("ignore", FutureWarning)
            wrapped = peft.get_peft_model(model, config)
    except ValueError as e:  # e.g. no module matches target_modules
        raise UserError(f"model.lora.target_modules={cfg.target_modules}: {str(e).splitlines()[0]}") from None
    if wrapped.get_base_model() is not model:  # the recipes rely on training this very object
        raise RuntimeError("peft did not inject the adapter in place")
    object.__setattr__(model, _HANDLE, wrapped)  # a plain attribute: not a submodule, not in state_dict
    if (dtype := precision.compute_dtype(model)) is not None:  # mixed precision: the new layers too
        precision.set_compute_dtype(model, precision.dtype_name(dtype))
    model.__dict__[_MOVED] = base_moved
    model.__dict__[_FROZEN] = frozen
    return model


def _vision_prefix(model) -> str | None:
    """The module path of a video-language model's vision tower (Qwen2.5-VL: 'model.visual';
    its merger is inside it), or None for a text model."""
    inner = getattr(model, "model", None)
    return "model.visual" if isinstance(getattr(inner, "visual", None), torch.nn.Module) else None


def base_moved(model) -> bool:
    """Whether the base under the adapter differs from the run's step_0 weights."""
    return bool(model.__dict__.get(_MOVED, False))


def _peft(model):
    if not has_lora(model):
        raise ValueError("the model has no LoRA adapter")
    return model.__dict__[_HANDLE]


def new_adapter(model, cfg, base_moved: bool) -> torch.nn.Module:
    """End a LoRA phase: merge the adapter into the base weights (in place) and start a
    fresh one. The model object stays the same, so engines holding it see the new weights.
    `base_moved`: False when the next checkpoint is step_0 (which then holds this base)."""
    if _sharded(model):  # FSDP2: the module tree stays; the fold and the fresh adapter go into the shards
        _fold_sharded(model, train_base=False)
        model.__dict__[_MOVED] = base_moved
        return model
    merge_adapter(model)
    return apply_lora(model, cfg, base_moved)


def merge_adapter(model) -> torch.nn.Module:
    """Fold the adapter into the base weights in place and remove it: a plain model again,
    its weights trainable as they were before `apply_lora` (peft froze them all; e.g. a
    video model's frozen tower stays frozen).

    Under FSDP2 (`parallel.fsdp`) the adapter layers stay in the tree (fully_shard owns
    them): the update is folded into the base shards, B set to zero (the adapter then adds
    exactly nothing) and frozen, the base trainable again; `new_adapter` turns it back on."""
    if has_lora(model) and _sharded(model):
        _fold_sharded(model, train_base=True)
    elif has_lora(model):
        merged = _peft(model).merge_and_unload()
        if merged is not model:
            raise RuntimeError("peft did not merge the adapter in place")
        del model.__dict__[_HANDLE]
        frozen = model.__dict__.pop(_FROZEN, set())
        for name, p in model.named_parameters():
            p.requires_grad_(name not in frozen)
    return model


def _sharded(model) -> bool:
    from longrl.parallel import fsdp

    return fsdp.is_sharded(model)


def _fold_sharded(model, train_base: bool) -> None:
    """`merge_adapter` + `apply_lora` for an FSDP2 model, in place and collective: W += s*B@A
    written into each rank's rows of the base shards, then a fresh adapter (A redrawn as
    peft draws it, kaiming-uniform, from one seed broadcast by rank 0 so every rank draws the
    same; B = 0); trainable: the adapters, or with `train_base` every weight that was
    trainable before `apply_lora` while the adapters stay frozen at B = 0."""
    import math

    from longrl.parallel import dist, fsdp

    shards = fsdp.sharded_parameters(model)
    seed = dist.broadcast_object(int(torch.randint(0, 2**62, ())) if dist.is_main() else None)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, layer in sorted(_lora_layers(model).items()):
            for adapter in sorted(layer.lora_A):
                delta = layer.get_delta_weight(adapter)  # [out, in] from the gathered A and B
                fsdp.write_rows(shards[f"{name}{_BASE}.weight"], delta, add=True)
                a_key, b_key = f"{name}.lora_A.{adapter}.weight", f"{name}.lora_B.{adapter}.weight"
                fresh = torch.empty(shards[a_key].shape, dtype=torch.float32)
                torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=gen)  # as peft's reset_lora_parameters
                fsdp.write_rows(shards[a_key], fresh)
                fsdp.write_rows(shards[b_key], torch.zeros(shards[b_key].shape))
    fsdp.reshard_and_gather(model)
    frozen = model.__dict__.get(_FROZEN, set())
    if train_base:
        fsdp.set_trainable(model, lambda n: "lora_" not in n and n.replace(f"{_BASE}.", ".") not in frozen)
    else:
        fsdp.set_trainable(model, lambda n: "lora_" in n)


@contextlib.contextmanager
def adapter_disabled(model):
    """Run `model` as its base: every adapter layer returns the base layer's output exactly."""
    with _peft(model).disable_adapter():
        yield model


class DisabledAdapter:
    """The reference policy of a LoRA run: the trained model itself with its adapter off.
    `with reference as model:` yields the model to run (`recipes.grpo.reference_logprobs`)."""

    def __init__(self, model):
        self.model = model
        self._ctx = None

    def __enter__(self):
        self._ctx = adapter_disabled(self.model)
        return self._ctx.__enter__()

    def __exit__(self, *exc):
        ctx, self._ctx = self._ctx, None
        return ctx.__exit__(*exc)


# ----------------------------------------------------------------------------------------
# Weights: merged (for plain transformers), base and adapter (for exact resume)
# ----------------------------------------------------------------------------------------


def _lora_layers(model) -> dict:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def _state(model) -> dict:
    """`model.state_dict()`'s tensors by name (parameters, tied ones under each name, and
    persistent buffers), read without its hooks: FSDP2's would reshard a sharded model and
    hand back DTensor shards; here a gathered model gives its full tensors."""
    out = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for k, p in module._parameters.items():
            if p is not None:
                out[dot + k] = p.detach()
        for k, b in module._buffers.items():
            if b is not None and k not in module._non_persistent_buffers_set:
                out[dot + k] = b
    return out


def base_state_dict(model) -> dict:
    """The base model's weights under their plain Hugging Face names (adapter left out)."""
    out = {}
    for key, value in _state(model).items():
        if any(part.startswith("lora_") for part in key.split(".")):
            continue  # the adapter's own weights (lora_A, lora_B, ...)
        out[key.replace(f"{_BASE}.", ".")] = value
    return out


def merged_state_dict(model) -> dict:
    """Plain Hugging Face weights of the adapted model: W + scale * B @ A for each wrapped
    layer (new tensors; the training model is left as it is)."""
    out = base_state_dict(model)
    with torch.no_grad():
        for name, layer in _lora_layers(model).items():
            for adapter in layer.active_adapters:
                if adapter in layer.lora_A:
                    key = f"{name}.weight"
                    out[key] = out[key] + layer.get_delta_weight(adapter).to(out[key].dtype)
    return out


def save_lora(model, out_dir: Path) -> None:
    """The adapter under `out_dir/adapter/` (peft's format) and, when the base is not
    step_0's weights (`base_moved`), the unmerged base as `lora_base.safetensors`."""
    from safetensors.torch import save_file

    adapter_dir = Path(out_dir) / ADAPTER_DIR
    peft_state = {f"base_model.model.{k}": v for k, v in _state(model).items()}  # the PeftModel's names
    _peft(model).save_pretrained(str(adapter_dir), safe_serialization=True, state_dict=peft_state)
    (adapter_dir / "README.md").unlink(missing_ok=True)  # peft's empty model-card template
    if base_moved(model):
        base = {k: v.detach().contiguous() for k, v in base_state_dict(model).items()}
        save_file(_untied(model, base), str(Path(out_dir) / BASE_FILE), metadata={"format": "pt"})


def _untied(model, state: dict) -> dict:
    """safetensors refuses two names for one storage: keep the first name of tied weights."""
    seen, out = {}, {}
    for key, value in state.items():
        ptr = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if ptr not in seen:
            seen[ptr] = key
            out[key] = value
    return out


def restore_lora(model, ckpt: Path, base_dir: Path) -> None:
    """Make `model` (adapter applied) exactly what it was when `ckpt` was written: the base
    from `ckpt/lora_base.safetensors`, or else from the step_0 checkpoint `base_dir`, and
    the adapter from `ckpt/adapter/`."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    ckpt = Path(ckpt)
    if _sharded(model):  # FSDP2: base and adapter come with the DCP shards (checkpoint.load_sharded_state), exactly
        model.__dict__[_MOVED] = (ckpt / BASE_FILE).is_file()
        return
    files = [ckpt / BASE_FILE] if (ckpt / BASE_FILE).is_file() else sorted(Path(base_dir).glob("*.safetensors"))
    adapter_file = ckpt / ADAPTER_DIR / "adapter_model.safetensors"
    if not files or not adapter_file.is_file():
        raise UserError(f"checkpoint {ckpt} has no LoRA adapter or base weights ({adapter_file.name} under {ADAPTER_DIR}/, "
                        f"{BASE_FILE} or {base_dir}/*.safetensors); it was not written by a model.lora run: resume "
                        f"it with model.lora.r=0, or start a new run")
    plain = {k.replace(f"{_BASE}.", "."): k for k in model.state_dict()}  # plain name -> name in the adapted model
    plain.update({disk: plain[k] for disk, k in _saved_names(model).items() if disk not in plain})
    params = dict(model.state_dict(keep_vars=True))
    with torch.no_grad():
        for f in files:
            for key, value in load_file(str(f)).items():
                if key not in plain:
                    raise UserError(f"{f}: weight {key!r} is not in this model; resume with the run's own model settings")
                params[plain[key]].copy_(value)
        result = set_peft_model_state_dict(_peft(model), load_file(str(adapter_file)))
    model.__dict__[_MOVED] = files == [ckpt / BASE_FILE]
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"{adapter_file}: adapter weights {result.unexpected_keys[:3]} do not fit model.lora; "
                        f"resume with the run's own model.lora settings")


def _saved_names(model) -> dict[str, str]:
    """Name in a `save_pretrained` file -> plain name, where they differ: transformers 5
    renames some models' weights on save (Qwen2.5-VL: `model.language_model.*` is written
    as `model.*`, `model.visual.*` as `visual.*`) and back on load. The names are read off
    transformers' own reverse mapping, which `save_pretrained` applies, matched by tensor."""
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without renaming on save
        return {}
    state = base_state_dict(model)
    by_id = {id(v): k for k, v in state.items()}
    return {disk: by_id[id(v)] for disk, v in revert_weight_conversion(model, state).items()
            if id(v) in by_id and by_id[id(v)] != disk}


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
