"""`longrl models convert-gguf`: a GGUF written here (gguf.GGUFWriter: a 2-layer llama with a
byte-level BPE tokenizer and a chat template) converts to a directory that plain
transformers loads and that gives the GGUF-loaded model's logits; bad inputs exit 2 with one
line and leave nothing behind.

No converter from a Hugging Face model to GGUF ships offline (llama.cpp's convert script is
not in the gguf wheel), so the file is written tensor by tensor; F32 and F16 tensors both
occur, the second checking that dequantised weights are what gets copied.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf", reason="the gguf extra (pip install 'longrl[gguf]') is not installed")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from tokenizers.pre_tokenizers import ByteLevel  # noqa: E402

from longrl.cli import main  # noqa: E402

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 32, 64, 2, 4, 2
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]


def _vocab() -> list[str]:
    """Special tokens, the 256 byte-level characters, then the tokens the merges make."""
    return [*SPECIALS, *sorted(ByteLevel.alphabet()), "Ġt", "he", "Ġthe"]


def write_tiny_gguf(path, arch: str = "llama", seed: int = 0) -> None:
    """A random 2-layer model of `arch` (llama names) with a gpt2-style tokenizer."""
    rng = np.random.default_rng(seed)
    tokens = _vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))  # 3: control, 1: normal
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_chat_template(CHAT_TEMPLATE)

    def tensor(name, *shape, dtype=np.float32, scale=0.2):
        w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(dtype))

    kv = HIDDEN // HEADS * KV_HEADS
    tensor("token_embd.weight", len(tokens), HIDDEN)
    tensor("output.weight", len(tokens), HIDDEN, dtype=np.float16)
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, np.float32))
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
        tensor(f"blk.{i}.attn_q.weight", HIDDEN, HIDDEN)
        tensor(f"blk.{i}.attn_k.weight", kv, HIDDEN)
        tensor(f"blk.{i}.attn_v.weight", kv, HIDDEN, dtype=np.float16)
        tensor(f"blk.{i}.attn_output.weight", HIDDEN, HIDDEN)
        tensor(f"blk.{i}.ffn_gate.weight", FFN, HIDDEN)
        tensor(f"blk.{i}.ffn_up.weight", FFN, HIDDEN)
        tensor(f"blk.{i}.ffn_down.weight", HIDDEN, FFN)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path)
    return path


def test_converted_directory_matches_the_gguf_model(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["models", "convert-gguf", str(tiny_gguf), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left

    ref = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32).eval()
    ref_tok = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    model = AutoModelForCausalLM.from_pretrained(out, local_files_only=True).eval()  # plain transformers
    tok = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert "quantization_config" not in (out / "config.json").read_text()

    messages = [{"role": "user", "content": "hat the thin"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhat the thin<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, return_tensors="pt").input_ids  # [1, T]
    assert ids.tolist() == ref_tok(text, return_tensors="pt").input_ids.tolist()
    assert ids[0, 0].item() == 1 and tok.convert_tokens_to_ids("Ġthe") in ids[0].tolist()  # specials whole, merges used
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == 2
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits  # [1, T, V]
    assert got.shape == (1, ids.shape[1], len(_vocab()))
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same float32 weights, the same program
    # the F16 tensors were dequantised, not rounded again on the way
    v = model.model.layers[0].self_attn.v_proj.weight
    assert v.dtype == torch.float32 and torch.equal(v, ref.model.layers[0].self_attn.v_proj.weight)


def _refused(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("longrl: error:") and "Traceback" not in err
    return err


@pytest.mark.reliability
def test_bad_inputs_exit_2_with_one_line(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "out"
    convert = ["models", "convert-gguf"]
    assert "does not exist" in _refused(capsys, [*convert, str(tmp_path / "missing.gguf"), "--out", str(out)])
    assert "is a directory" in _refused(capsys, [*convert, str(tmp_path), "--out", str(out)])

    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a gguf file")
    assert "not a GGUF file" in _refused(capsys, [*convert, str(not_gguf), "--out", str(out)])

    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_gguf.read_bytes()[:200])
    assert "not a readable GGUF file" in _refused(capsys, [*convert, str(truncated), "--out", str(out)])

    other = tmp_path / "other.gguf"
    write_tiny_gguf(other, arch="rwkv7")  # a real llama.cpp architecture transformers does not read
    err = _refused(capsys, [*convert, str(other), "--out", str(out)])
    assert "'rwkv7'" in err and "llama" in err

    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert "non-empty directory" in _refused(capsys, [*convert, str(tiny_gguf), "--out", str(full)])
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "is a file" in _refused(capsys, [*convert, str(tiny_gguf), "--out", str(a_file)])
    assert not out.exists()


def test_an_empty_out_directory_is_filled(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    assert main(["models", "convert-gguf", str(tiny_gguf), "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
