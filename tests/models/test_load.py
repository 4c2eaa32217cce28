from __future__ import annotations

import pytest
import torch

import cellcircuits as cc
from cellcircuits.models import ModelLoadError
from cellcircuits.pp import PromptConfig

from ..helpers import LABELS


def _logits(c2s, text="CD14 LYZ"):
    ids = c2s.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return c2s.model(input_ids=ids).logits


def test_save_load_round_trip(tiny_c2s, tmp_path):
    tiny_c2s.save(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert not list((tmp_path / "m").glob("*.bin"))  # never pickle
    loaded = cc.models.load(tmp_path / "m", device="cpu")
    torch.testing.assert_close(_logits(loaded), _logits(tiny_c2s))
    assert loaded.prompt == tiny_c2s.prompt
    assert loaded.labels == LABELS
    assert loaded.adapter.spec.name == "gpt_neox"
    assert loaded.tokenizer("HLA-DRA")["input_ids"] == tiny_c2s.tokenizer("HLA-DRA")["input_ids"]
    assert "tiny" not in repr(loaded) and "gpt_neox" in repr(loaded)


def test_missing_prompt_settings_give_c2s_defaults(tiny_c2s, tmp_path):
    tiny_c2s.save(tmp_path)
    (tmp_path / "cellcircuits.json").unlink()
    with pytest.warns(UserWarning, match=r"no cellcircuits.json .*n_genes=200.*' \{label\}\.' \+ EOS"):
        loaded = cc.models.load(tmp_path)
    assert loaded.prompt == PromptConfig()
    assert loaded.prompt.n_genes == 200 and loaded.labels is None


def test_dtype(tiny_c2s, tmp_path):
    tiny_c2s.save(tmp_path)
    assert cc.models.load(tmp_path, dtype=torch.float64).dtype == torch.float64
    assert cc.models.load(tmp_path, dtype="bfloat16").dtype == torch.bfloat16


def test_offline_hub_id_gives_actionable_error():
    with pytest.raises(ModelLoadError, match=r"hf download vandijklab/C2S-Pythia-410m.*--local-dir"):
        cc.models.load("vandijklab/C2S-Pythia-410m-cell-type-prediction", local_files_only=True)


def test_bad_paths(tmp_path):
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="is a file"):
        cc.models.load(f)
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        cc.models.load(tmp_path)
    with pytest.raises(KeyError, match="pbmc68k-tiny"):
        cc.models.shipped_model_path("nope")


def test_unsupported_architecture(tiny_tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(tiny_tokenizer))).save_pretrained(
        tmp_path
    )
    tiny_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"Unsupported architecture 'gpt2'.*gemma2.*gpt_neox.*llama"):
        cc.models.load(tmp_path)


def test_remote_code_is_off_unless_asked(tiny_c2s, tmp_path, monkeypatch):
    import transformers

    tiny_c2s.save(tmp_path)
    seen = []
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs["trust_remote_code"])
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    cc.models.load(tmp_path)
    cc.models.load(tmp_path, trust_remote_code=True)
    assert seen == [False, True]


def test_mistyped_hub_id_fails_fast():
    """One request, no retries: a missing repository (online) or an unreachable Hub (offline) is reported at once."""
    import time

    start = time.perf_counter()
    with pytest.raises(ModelLoadError, match=r"vandijklab/no-such-model"):
        cc.models.load("vandijklab/no-such-model")
    assert time.perf_counter() - start < 15  # the Hub client's retries took about 50 s


def test_missing_path_that_is_no_hub_id_fails_without_the_network(tmp_path, monkeypatch):
    import huggingface_hub
    import transformers

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub was asked")

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", no_network)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_network)
    for name in [str(tmp_path / "no-such-dir"), "./models/none", "~/none", "a/b/c", "has space"]:
        with pytest.raises(ModelLoadError, match=r"no such directory.*not a Hugging Face Hub id"):
            cc.models.load(name)


def test_hub_without_the_repository_says_so(monkeypatch):
    import huggingface_hub
    from huggingface_hub.utils import RepositoryNotFoundError

    class Missing(RepositoryNotFoundError):
        def __init__(self):
            Exception.__init__(self, "404 Client Error")  # the base class wants an HTTP response

    def not_found(*args, **kwargs):
        raise Missing

    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", not_found)
    with pytest.raises(ModelLoadError, match=r"Hub has no repository 'vandijklab/no-such-model'.*spelling"):
        cc.models.load("vandijklab/no-such-model")


def test_saved_files_get_the_umask_mode(tiny_c2s, tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        tiny_c2s.save(tmp_path / "m")
    finally:
        os.umask(old)
    for path in (tmp_path / "m").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name


def test_default_dtype_is_float32_on_cpu_and_bfloat16_on_cuda(tiny_c2s, tmp_path, monkeypatch):
    from cellcircuits.models._load import default_dtype

    tiny_c2s.model.to(torch.bfloat16)
    tiny_c2s.save(tmp_path)  # a bfloat16 checkpoint still runs in float32 on the CPU
    assert cc.models.load(tmp_path, device="cpu").dtype == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert default_dtype(torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert default_dtype(torch.device("cuda")) == torch.float32
    assert default_dtype(torch.device("cpu")) == torch.float32


def test_a_dtype_the_device_cannot_run_is_refused_before_loading(tiny_c2s, tmp_path, monkeypatch):
    import transformers

    tiny_c2s.save(tmp_path)
    real = torch.matmul

    def no_bf16(a, b, *args, **kwargs):
        if a.dtype == torch.bfloat16:
            raise RuntimeError('"addmm_impl_cpu_" not implemented for BFloat16')
        return real(a, b, *args, **kwargs)

    def never(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(torch, "matmul", no_bf16)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", never)
    with pytest.raises(ValueError, match=r"dtype=bfloat16 cannot run on cpu .*not implemented for BFloat16.*float32"):
        cc.models.load(tmp_path, device="cpu", dtype="bfloat16")
    with pytest.raises(ValueError, match="floating torch dtype"):
        cc.models.load(tmp_path, device="cpu", dtype="int8")
    with pytest.raises(ValueError, match="floating torch dtype"):
        cc.models.load(tmp_path, device="cpu", dtype="float33")
