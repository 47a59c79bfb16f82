"""Local Hugging Face directories of several architectures train through `longrl train`."""

import json

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)

from longrl.cli import main
from longrl.config import ModelConfig
from longrl.models.load import load_policy
from longrl.models.tiny import build_tiny_tokenizer

ARCHS = {
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}


def _save(tmp_path, arch):
    tok = build_tiny_tokenizer()
    cfg_cls, model_cls = ARCHS[arch]
    cfg = cfg_cls(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    path = tmp_path / arch
    model_cls(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_local_directory_loads_and_trains(tmp_path, arch):
    path = _save(tmp_path, arch)
    model, tok = load_policy(ModelConfig(path=str(path)), torch.device("cpu"))
    assert type(model).__name__.lower().startswith(arch) and tok.padding_side == "left"
    assert main(["train", f"model.path={path}", f"run.out_dir={tmp_path}", "run.name=r", "run.progress=false",
                 "task.n_train=50", "task.n_eval=4", "sft.steps=2", "sft.batch_size=4", "rl.steps=1",
                 "rl.prompts_per_step=2", "rl.group_size=2", "rollout.max_new_tokens=6", "eval.max_new_tokens=6"]) == 0
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["rl_steps"] == 1
    again, _ = load_policy(ModelConfig(path=summary["checkpoint"]), torch.device("cpu"))
    assert type(again) is type(model)


CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.mark.parametrize("setting,system", [("auto", "FORMAT"), ("", None), ("Answer in French.", "Answer in French.")])
def test_chat_models_are_told_the_response_format(tmp_path, setting, system):
    from longrl.eval.accuracy import encode_prompts
    from longrl.models.load import FORMAT_INSTRUCTION, format_prompt
    from longrl.data.example import Example

    path = _save(tmp_path, "qwen2")
    tok = build_tiny_tokenizer()
    tok.chat_template = CHAT
    tok.save_pretrained(path)  # an "instruct" checkpoint: its tokenizer has a chat template
    _, tok = load_policy(ModelConfig(path=str(path), system_prompt=setting), torch.device("cpu"))
    text = format_prompt(tok, "12+34=")
    want = FORMAT_INSTRUCTION if system == "FORMAT" else system
    head = f"<|system|>{want}\n" if want else ""
    assert text == f"{head}<|user|>12+34=\n<|assistant|>"
    assert tok.decode(encode_prompts(tok, [Example("e", "12+34=", "46")])[0]) == text  # rollouts and eval see it too
    _, tiny = load_policy(ModelConfig(system_prompt=setting), torch.device("cpu"))
    assert format_prompt(tiny, "12+34=") == "12+34="  # no template: the raw prompt


def test_supported_types_are_the_tested_ones():
    """The loader's list is honest: every type it accepts is trained end to end above (GLA in
    tests/models/test_models_gla_train.py), and its logits are lm_head(final hidden state)."""
    from longrl.models.load import SUPPORTED_MODEL_TYPES

    assert set(SUPPORTED_MODEL_TYPES) == set(ARCHS) | {"longrl_gla"}


def test_a_bad_directory_is_refused_naming_the_file(tmp_path):
    from safetensors.torch import save_file

    from longrl.errors import UserError
    from longrl.models.load import check_model_dir

    path = _save(tmp_path, "qwen2")
    assert check_model_dir(path) == "qwen2"
    weights = path / "model.safetensors"
    good = weights.read_bytes()
    for broken, reason in [(good[: len(good) - 1], "not fully covered"), (b"", "header too small"),
                           (b"\xff" * 64, "header too large")]:
        weights.write_bytes(broken)
        with pytest.raises(UserError, match=f"model.safetensors: not a readable safetensors file .*{reason}"):
            load_policy(ModelConfig(path=str(path)), torch.device("cpu"))
    save_file({"a": torch.zeros(2)}, str(path / "model-00002-of-00002.safetensors"))
    (path / "model-00002-of-00002.safetensors").write_bytes(b"\x08" + bytes(7))  # every shard is read
    with pytest.raises(UserError, match="model-00002-of-00002.safetensors"):
        check_model_dir(path, )
    (path / "config.json").write_text('{"model_type": "gemma2"}')
    with pytest.raises(UserError, match="'gemma2' model; this loader runs model types qwen2, qwen3, llama, mistral"):
        check_model_dir(path)
    (path / "config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="config.json: not a JSON object"):
        check_model_dir(path)


def test_cuda_without_torch_cuda_is_a_user_error(monkeypatch):
    from longrl.errors import UserError
    from longrl.models.load import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="torch sees no CUDA GPU"):
        check_device(torch.device("cuda"))
    check_device(torch.device("cpu"))


def _hub_cache(tmp_path, monkeypatch):
    """An empty Hugging Face hub cache for this test (HF_HUB_CACHE, as HF_HOME sets it)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_a_hub_id_in_the_local_cache_loads_without_a_download(tmp_path, monkeypatch):
    """`model.path=org/name` resolves to the cached snapshot that refs/main names, the layout
    `hf download` leaves (models--org--name/refs/main + snapshots/<commit>/): the weights
    loaded are that snapshot's."""
    cache = _hub_cache(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)  # no local directory called longrl-test/tiny-qwen
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--longrl-test--tiny-qwen"
    (repo / "snapshots").mkdir(parents=True)
    _save(tmp_path, "qwen2").rename(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    from safetensors.torch import load_file

    model, tok = load_policy(ModelConfig(path="longrl-test/tiny-qwen"), torch.device("cpu"))
    want = load_file(str(repo / "snapshots" / commit / "model.safetensors"))
    got = model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want) and tok.padding_side == "left"


def test_a_hub_id_not_in_the_cache_says_how_to_fetch_it(tmp_path, monkeypatch):
    from longrl.errors import UserError
    from longrl.models.load import resolve_model_path

    cache = _hub_cache(tmp_path, monkeypatch)
    monkeypatch.chdir(tmp_path)

    with pytest.raises(UserError, match=rf"model.path 'Qwen/Qwen2.5-0.5B' is neither a local directory nor a model in "
                                        rf"the local Hugging Face cache \({cache}\); longrl never downloads: fetch it once "
                                        r"with `hf download Qwen/Qwen2.5-0.5B`"):
        load_policy(ModelConfig(path="Qwen/Qwen2.5-0.5B"), torch.device("cpu"))
    assert main(["eval", "model=Qwen/Qwen2.5-0.5B", "task=addition"]) == 2
    # a local directory of that name wins; a path that is no hub id keeps the directory message
    (tmp_path / "Qwen" / "Qwen2.5-0.5B").mkdir(parents=True)
    assert resolve_model_path("Qwen/Qwen2.5-0.5B").resolve() == tmp_path / "Qwen" / "Qwen2.5-0.5B"
    with pytest.raises(UserError, match="model.path 'nope/x' is not a directory"):
        load_policy(ModelConfig(path="./nope/x"), torch.device("cpu"))
