"""Every way the ecosystem saves a model keeps a normswap conversion (normswap.carry).

Each path is a round trip against the real package (transformers' Trainer, accelerate, PEFT,
sentence-transformers, huggingface_hub's upload, monkeypatched): the folder it writes reloads, with
normswap.load and through the Auto and concrete classes, to the same outputs, bit for bit.
Models: a tiny Llama with its gains folded, the gpt2 stand-in (RMSNorm, folded) and
all-MiniLM-L6-v2 converted to DyT and to RMSNorm.
"""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

import normswap
from normswap.loading import is_converted
from tiny_models import model_output, rel_error, tiny_inputs, tiny_model

MODELS = ["llama-folded", "standin-rms", "minilm-dyt", "minilm-rms"]
CAUSAL = ["llama-folded", "standin-rms"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory, request):
    """name -> a converted folder, written once per module."""
    from normswap.assets import asset

    root = tmp_path_factory.mktemp("converted")
    made: dict[str, object] = {}

    def get(name: str):
        if name in made:
            return made[name]
        if name == "llama-folded":
            model, _ = normswap.convert(tiny_model("llama"), "rmsnorm", fold=True, tied_head="untie")
        else:
            src = asset("gpt2-standin-wt2" if name.startswith("standin") else "all-MiniLM-L6-v2")
            if not src.exists():
                pytest.skip(f"asset {src} not available (set NORMSWAP_ASSETS)")
            model, _ = normswap.convert(str(src), name.split("-")[1].replace("rms", "rmsnorm"), fold=True, calib_tokens=512)
        made[name] = normswap.save(model, root / name)
        return made[name]

    return get


def _inputs(model):
    return tiny_inputs(model, length=10)


def _same(folder_a, folder_b, **load_kw):
    a, b = normswap.load(folder_a, **load_kw), normswap.load(folder_b, **load_kw)
    x = _inputs(a)
    return torch.equal(model_output(a, x), model_output(b, x))


def _has_converted_norms(model) -> int:
    return sum(type(m).__module__ == "normswap.modules" and type(m).__name__ in ("RMSNorm", "DyT") for m in model.modules())


@pytest.mark.parametrize("name", MODELS)
def test_save_pretrained_round_trip(converted, tmp_path, name, caplog):
    from transformers import AutoModel

    folder = converted(name)
    model = normswap.load(folder)
    assert model.name_or_path == str(folder) and model.config.name_or_path == str(folder)
    model.save_pretrained(tmp_path / "again")
    assert is_converted(tmp_path / "again")
    cfg = json.loads((tmp_path / "again" / "config.json").read_text())
    assert cfg["model_type"] == "normswap" and "_name_or_path" not in cfg  # no stale local path written down
    with caplog.at_level(logging.WARNING, logger="normswap"):
        again = normswap.load(tmp_path / "again")
    assert "digest" not in caplog.text
    x = _inputs(model)
    ref = model_output(model, x)
    assert torch.equal(ref, model_output(again, x))
    assert _has_converted_norms(again) == _has_converted_norms(model) > 0
    # The Auto classes and the concrete class (what PEFT's auto mapping calls) rebuild it too.
    by_class = getattr(__import__("transformers"), type(model).__name__).from_pretrained(tmp_path / "again")
    assert torch.equal(ref, model_output(by_class, x))
    body = AutoModel.from_pretrained(tmp_path / "again") if name.startswith("minilm") else None
    if body is not None:
        assert torch.equal(ref, model_output(body, x))


def test_a_copy_and_a_half_precision_model_save_what_they_are(converted, tmp_path):
    import copy

    model = normswap.load(converted("llama-folded"))
    twin = copy.deepcopy(model).to(torch.bfloat16)
    twin.config.save_pretrained(tmp_path / "cfg")  # the copy's config describes the copy, not the original
    assert json.loads((tmp_path / "cfg" / "config.json").read_text())["normswap"]["dtype"] == "bfloat16"
    twin.save_pretrained(tmp_path / "bf16")
    back = normswap.load(tmp_path / "bf16")
    assert back.dtype == torch.bfloat16
    x = _inputs(model)
    assert torch.equal(model_output(twin, x), model_output(back, x))


def test_a_plain_model_keeps_transformers_save(tmp_path):
    model = tiny_model("gpt2")
    model.save_pretrained(tmp_path / "plain")
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["model_type"] == "gpt2"
    assert "save_pretrained" not in model.__dict__


@pytest.mark.parametrize("name", MODELS)
def test_accelerate_save_model_with_config(converted, tmp_path, name):
    """accelerate's save_model writes weights only; the carried config written beside them (with
    its digest taken from the model) makes the folder a checkpoint normswap.load verifies."""
    from accelerate import Accelerator

    model = normswap.load(converted(name))
    acc = Accelerator(cpu=True)
    prepared = acc.prepare(model)
    acc.save_model(prepared, tmp_path / "acc")
    acc.unwrap_model(prepared).config.save_pretrained(tmp_path / "acc")
    assert json.loads((tmp_path / "acc" / "config.json").read_text())["normswap"]["digest"] is not None
    assert _same(converted(name), tmp_path / "acc")
    # accelerate's documented way: save_pretrained with its save function and gathered state dict
    acc.unwrap_model(prepared).save_pretrained(tmp_path / "acc2", is_main_process=acc.is_main_process,
                                               save_function=acc.save, state_dict=acc.get_state_dict(prepared))
    assert _same(converted(name), tmp_path / "acc2")


@pytest.mark.parametrize("name", ["llama-folded", "minilm-dyt"])
def test_push_to_hub_uploads_the_export(converted, tmp_path, monkeypatch, name, capsys, caplog):
    """push_to_hub of a carried model uploads the Hub export (remote code, card, tokenizer): the
    uploaded folder loads back with normswap; the token is never printed or logged."""
    import huggingface_hub

    uploaded = tmp_path / "uploaded"
    calls = {}

    def create_repo(self, repo_id, **kw):
        calls["repo"] = repo_id
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kw):
        shutil.copytree(folder_path, uploaded)
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/0", commit_message="m",
                                          commit_description="", oid="0" * 40)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    secret = "hf_" + "x" * 34
    model = normswap.load(converted(name))
    with caplog.at_level(logging.DEBUG):
        url = model.push_to_hub("me/converted", token=secret)
    assert calls["repo"] == "me/converted" and url.startswith("https://huggingface.co/me/converted")
    names = {p.name for p in uploaded.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_normswap.py", "README.md"} <= names
    assert "tokenizer.json" in names or name == "llama-folded"  # the tiny Llama has no tokenizer
    cfg = json.loads((uploaded / "config.json").read_text())
    assert cfg["auto_map"]
    # provenance says "a local checkpoint", never a path of this machine (the digest still verifies, below)
    assert str(converted(name).parent) not in json.dumps(cfg) and "/tmp" not in json.dumps(cfg)
    if name.startswith("minilm"):
        assert cfg["normswap"]["source"]["model"] == "a local checkpoint"
    assert _same(converted(name), uploaded)
    out = capsys.readouterr()
    assert secret not in out.out + out.err + caplog.text


def _lm_data(n: int = 8, length: int = 16, vocab: int = 100):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": (ids := torch.randint(3, vocab, (length,), generator=g)), "labels": ids.clone()} for _ in range(n)]


def _train_args(out, steps: int):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=2, save_steps=1,
                             save_strategy="steps", learning_rate=1e-3, report_to=[], logging_steps=100, use_cpu=True,
                             seed=0, dataloader_num_workers=0, disable_tqdm=True)


def _student(name, folder):
    """The model a Trainer trains: causal LMs as they are; MiniLM (a bare BertModel) with a masked-LM
    head, so the checkpoint is of another class than the record's and must say so."""
    from transformers import AutoModelForMaskedLM

    if name in CAUSAL:
        return normswap.load(folder)
    return normswap.load(folder, auto_class=AutoModelForMaskedLM, allow_new_head=True)


@pytest.mark.parametrize("name", MODELS)
def test_trainer_checkpoint_and_resume(converted, tmp_path, name):
    from transformers import Trainer

    folder = converted(name)
    data = _lm_data()
    model = _student(name, folder)
    Trainer(model=model, args=_train_args(tmp_path / "run", 3), train_dataset=data).train()
    model.eval()
    last = tmp_path / "run" / "checkpoint-3"
    assert is_converted(last) and (last / "optimizer.pt").is_file()  # the Trainer's own files beside ours
    x = _inputs(model)
    reloaded = normswap.load(last)
    assert type(reloaded) is type(model)
    assert torch.equal(model_output(model, x), model_output(reloaded, x))
    assert _has_converted_norms(reloaded) > 0
    # resuming from the first checkpoint lands on the same weights as the uninterrupted run
    again = _student(name, folder)
    Trainer(model=again, args=_train_args(tmp_path / "resumed", 3), train_dataset=data).train(
        resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-1"))
    again.eval()
    assert torch.equal(model_output(model, x), model_output(again, x))


def test_seq2seq_trainer_checkpoint(tmp_path):
    from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

    model, _ = normswap.convert(tiny_model("whisper"), "rmsnorm", fold=True)
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    data = [{"input_features": torch.randn(cfg.num_mel_bins, 2 * cfg.max_source_positions, generator=g),
             "labels": torch.randint(3, 100, (6,), generator=g)} for _ in range(4)]
    args = Seq2SeqTrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2, save_steps=2,
                                    report_to=[], use_cpu=True, seed=0, disable_tqdm=True, learning_rate=1e-3)
    Seq2SeqTrainer(model=model, args=args, train_dataset=data).train()
    model.eval()
    back = normswap.load(tmp_path / "run" / "checkpoint-2")
    x = tiny_inputs(model)
    assert torch.equal(model_output(model, x), model_output(back, x))


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("task_type", [None, "task"])
def test_auto_peft_rebuilds_the_converted_base(converted, tmp_path, name, task_type):
    """An adapter trained on a converted model names the converted folder as its base, and
    AutoPeft* rebuilds that base, with or without a task type (without one, PEFT calls the
    concrete class's from_pretrained, which `import normswap` routes to normswap.load)."""
    from peft import AutoPeftModel, AutoPeftModelForCausalLM, LoraConfig, get_peft_model

    folder = converted(name)
    model = normswap.load(folder)
    targets = ["q_proj", "v_proj"] if name == "llama-folded" else (["c_attn"] if name.startswith("standin") else ["query", "value"])
    kind = ("CAUSAL_LM" if name in CAUSAL else "FEATURE_EXTRACTION") if task_type else None
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, task_type=kind))
    assert peft_model.peft_config["default"].base_model_name_or_path == str(folder)
    peft_model.save_pretrained(tmp_path / "adapter")
    auto = AutoPeftModelForCausalLM if name in CAUSAL else AutoPeftModel
    if kind == "FEATURE_EXTRACTION":
        from peft import AutoPeftModelForFeatureExtraction as auto
    back = auto.from_pretrained(tmp_path / "adapter")
    x = _inputs(model)
    assert torch.equal(model_output(peft_model, x), model_output(back, x))
    assert _has_converted_norms(back) > 0
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    assert is_converted(tmp_path / "merged")
    merged_back = normswap.load(tmp_path / "merged")
    assert torch.equal(model_output(merged, x), model_output(merged_back, x))
    # merging adds the (random, large) LoRA product into the weights: float32 rounding, nothing more
    assert rel_error(model_output(back, x), model_output(merged_back, x)) < 1e-3


SENTENCES = ["A man is playing a guitar.", "The weather is lovely today.", "Norms read a zero-mean stream."]


@pytest.mark.parametrize("name", ["minilm-dyt", "minilm-rms"])
def test_sentence_transformers_load_and_save(converted, tmp_path, name):
    """SentenceTransformer(folder) gives the converted model's mean-pooled, normalised embeddings
    (computed here by hand from normswap.load), and .save() round-trips them."""
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    folder = converted(name)
    for f in ("modules.json", "config_sentence_transformers.json", "1_Pooling/config.json"):
        assert (folder / f).is_file(), f  # normswap convert keeps the sentence-transformers files
    st = SentenceTransformer(str(folder), device="cpu")
    emb = st.encode(SENTENCES, convert_to_tensor=True)
    model, tok = normswap.load(folder), AutoTokenizer.from_pretrained(folder)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    by_hand = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(emb, by_hand, rtol=0, atol=1e-6)
    st.save(str(tmp_path / "st"))
    assert is_converted(tmp_path / "st")
    assert torch.equal(SentenceTransformer(str(tmp_path / "st"), device="cpu").encode(SENTENCES, convert_to_tensor=True), emb)


def test_sentence_transformers_export_without_normswap(converted, tmp_path):
    """The Hub export loads in SentenceTransformer with trust_remote_code=True in a process that
    never imports normswap, gives the same embeddings, and saves a folder that is still normswap's."""
    import subprocess
    import sys

    from sentence_transformers import SentenceTransformer

    from normswap.export import export_for_hub

    folder = converted("minilm-dyt")
    export_for_hub(folder, tmp_path / "hub")
    ref = SentenceTransformer(str(folder), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    script = (
        "import sys, torch\n"
        "from sentence_transformers import SentenceTransformer\n"
        f"st = SentenceTransformer({str(tmp_path / 'hub')!r}, device='cpu', trust_remote_code=True)\n"
        f"torch.save(st.encode({SENTENCES!r}, convert_to_tensor=True), {str(tmp_path / 'emb.pt')!r})\n"
        f"st.save({str(tmp_path / 'resaved')!r})\n"
        "assert 'normswap' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=300)
    assert torch.equal(torch.load(tmp_path / "emb.pt"), ref)
    assert is_converted(tmp_path / "resaved") and (tmp_path / "resaved" / "modeling_normswap.py").is_file()
    assert torch.equal(SentenceTransformer(str(tmp_path / "resaved"), device="cpu").encode(SENTENCES, convert_to_tensor=True), ref)


def test_normswap_save_writes_the_tokenizer_it_was_converted_with(tmp_path, standin_path):
    """The README's snippet: normswap.save(model, out) with no tokenizer argument."""
    model, result = normswap.convert(str(standin_path), "rmsnorm", fold=True)
    normswap.save(model, tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    assert model.name_or_path == str(tmp_path / "out")
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "out")("hello world")["input_ids"]


def test_normswap_save_refuses_a_plain_model(tmp_path):
    with pytest.raises(normswap.NormswapError, match="needs a conversion record"):
        normswap.save(tiny_model("gpt2"), tmp_path / "out")
