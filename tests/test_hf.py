"""Hugging Face models (hf:PATH) on small BERTs with random weights, made here from a transformers config."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from keiryo import artifacts  # noqa: E402
from keiryo.cli import main  # noqa: E402
from keiryo.compress.distill import Distill, distill  # noqa: E402
from keiryo.compress.prune import prune  # noqa: E402
from keiryo.errors import ConfigError, ModelError  # noqa: E402
from keiryo.hf import HFModel  # noqa: E402
from keiryo.hf_text import embedding_quality, text_data  # noqa: E402
from keiryo.loop import TrainConfig  # noqa: E402
from keiryo.measuring import compare  # noqa: E402
from keiryo.metrics import Timing  # noqa: E402
from keiryo.models import build_model, spec_of  # noqa: E402

WORDS = "the a cat dog sat on mat ran fast slow red blue house car tree big small quickly over under".split()
TEXTS = [
    "the cat sat on the mat",
    "a dog ran fast",
    "big red car",
    "the small tree jumps over the blue house quickly",
    "the dog sat under a tree",
    "red house",
    "a slow cat jumps",
    "the big blue car ran over the mat",
]


def _make_dir(path, classifier: bool = False):
    """A 2-layer, 4-head BERT (hidden 32, FFN 64) with a WordPiece tokenizer, saved as a HF directory."""
    path.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizer(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, initializer_range=0.2, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    model = (transformers.BertForSequenceClassification if classifier else transformers.BertModel)(config)
    model.save_pretrained(path)
    if not classifier:  # a sentence-transformers directory: mean pooling, then L2 normalisation
        modules = [{"type": "sentence_transformers.models.Transformer"}, {"type": "x.Normalize"}]
        (path / "modules.json").write_text(json.dumps(modules))
    return path


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return _make_dir(tmp_path_factory.mktemp("hf") / "encoder")


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    return _make_dir(tmp_path_factory.mktemp("hf") / "classifier", classifier=True)


@pytest.fixture()
def encoder(encoder_dir):
    return build_model(f"hf:{encoder_dir}")


def _reference_embeddings(directory, tokens):
    """What sentence-transformers computes: BertModel, mean over the mask, normalised (the oracle)."""
    model = transformers.BertModel.from_pretrained(directory, attn_implementation="eager").eval()
    with torch.no_grad():
        hidden = model(input_ids=tokens[:, 0], attention_mask=tokens[:, 1]).last_hidden_state
    mask = tokens[:, 1].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def test_embeddings_match_transformers_and_text_goes_through_the_tokenizer(encoder, encoder_dir):
    assert spec_of(encoder) == {"factory": f"hf:{encoder_dir}", "kwargs": {}}
    tokens = encoder.tokenize(TEXTS)
    assert tokens.shape[:2] == (len(TEXTS), 2) and tokens.dtype == torch.int64
    assert tokens[:, 1].sum(1).tolist() == [len(t.split()) + 2 for t in TEXTS]  # [CLS] words [SEP]
    with torch.no_grad():
        mine = encoder(tokens)
        torch.testing.assert_close(mine, _reference_embeddings(encoder_dir, tokens), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(encoder(TEXTS), mine)  # texts → the directory's tokenizer
        torch.testing.assert_close(encoder(tokens.float()), mine)  # data files store float32 ids
        torch.testing.assert_close(encoder(tokens[:1]), mine[:1], atol=1e-5, rtol=1e-4)  # padding trimmed
    assert torch.allclose(mine.norm(dim=1), torch.ones(len(TEXTS)))
    assert not torch.allclose(mine[0], mine[1], atol=1e-3)


def test_classifier_returns_the_logits_and_is_measured_by_label_agreement(classifier_dir):
    model = build_model(f"hf:{classifier_dir}")
    assert model.task == "classifier"
    tokens = model.tokenize(TEXTS)
    reference = transformers.BertForSequenceClassification.from_pretrained(classifier_dir).eval()
    with torch.no_grad():
        logits = reference(input_ids=tokens[:, 0], attention_mask=tokens[:, 1]).logits
        torch.testing.assert_close(model(tokens), logits, atol=1e-5, rtol=1e-4)
    labels = logits.argmax(1)
    pruned = prune(model, 0.25, example_inputs=tokens)
    timing = Timing(batch_sizes=(2,), runs=2)
    result = compare({"model": model, "pruned": pruned}, tokens, (tokens, labels), timing)
    assert result.rows[0].accuracy == 1.0  # labels are the model's own predictions
    assert result.rows[1].agreement.top1 is not None


def test_prune_removes_heads_and_feed_forward_width_and_round_trips(encoder, tmp_path):
    tokens = encoder.tokenize(TEXTS)
    pruned = prune(encoder, 0.25, example_inputs=tokens)
    for block in pruned.model.encoder.layer:
        attention = block.attention.self
        assert attention.num_heads == 3 and attention.qkv.out_features == 3 * 3 * 8  # 3 heads of 8
        assert block.attention.output.dense.in_features == 24
        assert block.intermediate.dense.out_features == 48 and block.output.dense.in_features == 48
        assert block.output.dense.out_features == 32  # the residual width (embedding size) is kept
    quality = embedding_quality(pruned, encoder, tokens)
    assert 0 < quality.cosine_mean < 1 and quality.sentences == len(TEXTS)
    artifacts.save(pruned, tmp_path / "pruned.pt")
    loaded = artifacts.load(tmp_path / "pruned.pt")  # an hf: directory runs no code: no trust_code
    assert [b.attention.self.num_heads for b in loaded.model.encoder.layer] == [3, 3]
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), pruned(tokens))


def test_student_of_the_same_config_is_distilled_towards_the_teacher(encoder, encoder_dir, tmp_path):
    student = build_model(f"hf:{encoder_dir}", layers=1, intermediate_size=32)
    assert len(student.model.encoder.layer) == 1
    assert student.model.encoder.layer[0].intermediate.dense.out_features == 32
    # the kept layer is the teacher's last one, with the 32 neurons of largest weight norm
    kept = encoder.model.encoder.layer[1]
    torch.testing.assert_close(
        student.model.encoder.layer[0].attention.self.qkv.weight, kept.attention.self.qkv.weight
    )
    texts = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(3 + i % 6)) for i in range(120)]
    data = text_data(encoder, texts)
    tokens = encoder.tokenize(texts)
    before = embedding_quality(student, encoder, tokens)
    train = TrainConfig(epochs=4, lr=3e-3, device="cpu", progress=False)
    distill(encoder, student, data, Distill(loss="cosine", alpha=1.0), train)
    after = embedding_quality(student, encoder, tokens)
    assert after.cosine_mean > before.cosine_mean
    artifacts.save(student, tmp_path / "student.pt")
    loaded = artifacts.load(tmp_path / "student.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), student(tokens))


def test_int8_quantized_encoder_keeps_its_embeddings_and_round_trips(encoder, tmp_path):
    quantize_module = pytest.importorskip("keiryo.compress.quantize")
    tokens = encoder.tokenize(TEXTS)
    policy = pytest.importorskip("keiryo.compress.qconfig").Policy(backend="fbgemm", min_top1=0.0, runs=2)
    quantized = quantize_module.quantize(encoder, "int8-dynamic", example_inputs=tokens, policy=policy)
    quality = embedding_quality(quantized, encoder, tokens)
    assert quality.cosine_mean > 0.95
    artifacts.save(quantized, tmp_path / "int8.pt")
    loaded = artifacts.load(tmp_path / "int8.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), quantized(tokens))


def test_embedding_quality_against_known_neighbours():
    reference = torch.tensor([[1.0, 0, 0], [0.9, 0.1, 0], [0, 1, 0], [0, 0.9, 0.1], [0, 0, 1], [0.1, 0, 0.9]])

    class Fixed(torch.nn.Module):
        def __init__(self, rows):
            super().__init__()
            self.rows = rows

        def forward(self, index):
            return self.rows[index]

    index = torch.arange(6)
    same = embedding_quality(Fixed(reference), Fixed(reference), index, k=1)
    assert (same.cosine_mean, same.top1_agreement, same.top5_overlap) == pytest.approx((1.0, 1.0, 1.0))
    swapped = reference[[0, 2, 1, 3, 4, 5]]  # rows 1 and 2 trade clusters: rows 0-3 find other neighbours
    other = embedding_quality(Fixed(swapped), Fixed(reference), index, k=1)
    assert other.top1_agreement == pytest.approx(2 / 6)
    assert other.cosine_min == pytest.approx(float(F.cosine_similarity(reference[1], reference[2], dim=0)))


def test_errors_are_one_line_and_name_the_value(encoder, encoder_dir, tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        build_model(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(ModelError, match="no config.json"):
        build_model(f"hf:{tmp_path}")
    with pytest.raises(ConfigError, match="layers must be between 1 and 2"):
        build_model(f"hf:{encoder_dir}", layers=3)
    with pytest.raises(ConfigError, match="unknown task 'regression'"):
        build_model(f"hf:{encoder_dir}", task="regression")
    with pytest.raises(ModelError, match=r"\(batch, 2, length\)"):
        encoder(torch.zeros(2, 5, dtype=torch.long))
    no_tokenizer = tmp_path / "bare"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((encoder_dir / name).read_bytes())
    bare = build_model(f"hf:{no_tokenizer}")
    assert isinstance(bare, HFModel)
    with pytest.raises(ConfigError, match="has no tokenizer"):
        bare(["a text"])


def test_cli_turns_a_folder_into_a_model_file_that_other_commands_take(encoder_dir, tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n\n")
    model, tokens = tmp_path / "model.pt", tmp_path / "tokens.pt"
    args = ["hf", str(encoder_dir), "--texts", str(texts), "-o", str(model), "--data-out", str(tokens)]
    assert main([*args, "--runs", "2"]) == 0
    assert "keiryo hf (embedding, 8 texts)" in capsys.readouterr().out
    pruned = tmp_path / "pruned.pt"
    assert main(["prune", str(model), "--ratio", "0.25", "--data", str(tokens), "-o", str(pruned)]) == 0
    assert artifacts.load(pruned).model.encoder.layer[0].attention.self.num_heads == 3
    assert main(["hf", str(tmp_path / "nowhere"), "-o", str(model)]) == 2
    assert "does not exist" in capsys.readouterr().err
