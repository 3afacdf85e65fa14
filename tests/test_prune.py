from __future__ import annotations

import time

import pytest
import torch
from multi_input import tiny_bert
from torch import nn

from keiryo import artifacts, provenance, sparse
from keiryo.compress.prune import magnitude_masks, max_ratio, prune, sparsity
from keiryo.compress.prune_config import Structured, Unstructured, check_options, method_from
from keiryo.errors import ArtifactError, ConfigError, ModelError
from keiryo.loop import TrainConfig, fit
from keiryo.metrics import accuracy, count_flops, count_parameters
from keiryo.models import Attention, build_model

X = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(1))
SMALL = {
    "cnn": {"width": 16},
    "mlp": {"hidden": [64, 32]},
    "transformer": {"dim": 32, "heads": 4},
}


def finetune(epochs: int) -> TrainConfig:
    """The fine-tuning settings these tests use: a few quiet epochs on the CPU."""
    return TrainConfig(epochs=epochs, lr=1e-3, progress=False, device="cpu")


def params(model: nn.Module) -> int:
    return count_parameters(model)[0]


@pytest.mark.parametrize("name", ["cnn", "mlp", "transformer"])
def test_structured_pruning_shrinks_and_round_trips(tmp_path, name):
    model = build_model(name, **SMALL[name]).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pruned = prune(model, 0.5, example_inputs=X)
    assert params(pruned) < 0.6 * params(model)
    assert pruned(X).shape == model(X).shape == (6, 10)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input is untouched
    loaded = artifacts.load(artifacts.save(pruned, tmp_path / "pruned.pt"))
    assert torch.equal(loaded(X), pruned(X))
    assert provenance.metadata_of(loaded)["pruning"]["ratio"] == 0.5


def test_provenance_is_the_config_and_reads_back():
    model = build_model("mlp", hidden=[32, 16]).eval()
    config = Unstructured(0.6, global_pruning=True, steps=2, protect=[model.fc0])
    record = provenance.metadata_of(prune(model, config, example_inputs=X))["pruning"]
    protected = ["classifier", "fc0"]  # the classifier always, then `protect` as layer names
    assert record == {
        "kind": "unstructured",
        "ratio": 0.6,
        "global_pruning": True,
        "protect": protected,
        "steps": 2,
        "finetune": None,
        "distilled": False,
    }
    fields = {k: v for k, v in record.items() if k not in ("finetune", "distilled")}
    assert method_from(fields) == Unstructured(0.6, global_pruning=True, steps=2, protect=protected)


def test_cnn_channels_tied_by_residuals_and_batchnorm_are_removed_together():
    model = build_model("cnn", width=16, blocks=2).eval()
    pruned = prune(model, 0.5, example_inputs=X)
    stream = pruned.stem[0].out_channels
    assert stream == 8 and pruned.stem[1].num_features == 8 and pruned.fc.in_features == 8
    for block in pruned.blocks:
        assert block.conv1.in_channels == block.conv2.out_channels == block.bn2.num_features == stream
        assert block.conv1.out_channels == block.bn1.num_features == block.conv2.in_channels == 8
    assert pruned.fc.out_features == 10  # the classifier is protected


def test_structured_removes_the_unimportant_channels_exactly():
    """Neurons whose weights are all zero contribute nothing; removing just those keeps the outputs."""
    model = build_model("mlp", in_features=64, hidden=[32, 16], num_classes=10).eval()
    dead = torch.arange(0, 32, 2)
    with torch.no_grad():
        model.fc0.weight[dead] = 0
        model.fc0.bias[dead] = 0
        model.fc1.weight[:, dead] = 0
    pruned = prune(model, Structured(0.5, protect=["fc1"]), example_inputs=X)
    assert pruned.fc0.out_features == 16 and pruned.fc1.out_features == 16
    assert torch.allclose(pruned(X), model(X), atol=1e-6)


def test_bn_importance_removes_channels_with_zero_scale():
    model = build_model("cnn", width=16, blocks=1).eval()
    dead = torch.arange(8, 16)
    with torch.no_grad():
        for bn in (model.stem[1], model.blocks[0].bn1, model.blocks[0].bn2):
            bn.weight[dead] = 0
            bn.bias[dead] = 0
    pruned = prune(model, Structured(0.5, importance="bn"), example_inputs=X)
    assert pruned.stem[0].out_channels == 8
    assert torch.allclose(pruned(X), model(X), atol=1e-5)


def test_transformer_loses_whole_heads_and_ffn_width():
    torch.manual_seed(0)
    model = build_model("transformer", dim=32, heads=4, mlp_ratio=2).eval()
    head_dim = 8
    with torch.no_grad():  # heads 0 and 2, and half of each feed-forward layer, do nothing
        for block in model.blocks:
            for head in (0, 2):
                for part in range(3):  # q, k and v rows of this head
                    rows = slice(part * 32 + head * head_dim, part * 32 + (head + 1) * head_dim)
                    block.attn.qkv.weight[rows] = 0
                    block.attn.qkv.bias[rows] = 0
                block.attn.proj.weight[:, head * head_dim : (head + 1) * head_dim] = 0
            block.mlp.fc1.weight[32:] = 0
            block.mlp.fc1.bias[32:] = 0
            block.mlp.fc2.weight[:, 32:] = 0
    pruned = prune(model, 0.5, example_inputs=X)
    for block in pruned.blocks:
        attn = block.attn
        assert isinstance(attn, Attention) and attn.num_heads == 2
        assert attn.qkv.out_features == 3 * 2 * head_dim and attn.proj.in_features == 2 * head_dim
        assert block.mlp.fc1.out_features == 32 and block.norm1.normalized_shape == (32,)  # width kept
    assert torch.allclose(pruned(X), model(X), atol=1e-5)
    assert count_flops(pruned, X) < count_flops(model, X)


@pytest.mark.parametrize("target", ["params", "flops"])
def test_target_ratio_of_params_or_flops(target):
    model = build_model("cnn", width=16).eval()
    pruned = prune(model, Structured(0.5, target=target), example_inputs=X)
    measure = (lambda m: params(m)) if target == "params" else (lambda m: count_flops(m, X))
    kept = measure(pruned) / measure(model)
    assert 0.4 <= kept <= 0.5


def test_global_ranking_prunes_layers_unevenly():
    model = build_model("mlp", in_features=64, hidden=[64, 64], num_classes=10).eval()
    with torch.no_grad():  # half of fc0's neurons are near zero: a global ranking takes them from fc0 first
        model.fc0.weight[:32].mul_(0.01)
        model.fc0.bias[:32].mul_(0.01)
        model.fc1.weight[:, :32].mul_(0.01)
    pruned = prune(model, Structured(0.4, global_pruning=True), example_inputs=X)
    assert pruned.fc0.out_features < pruned.fc1.out_features
    per_layer = prune(model, 0.4, example_inputs=X)
    assert per_layer.fc0.out_features == per_layer.fc1.out_features


@pytest.mark.parametrize("global_pruning", [False, True])
def test_unstructured_is_permanent_exact_and_compact(tmp_path, global_pruning):
    torch.manual_seed(0)
    model = build_model("mlp", in_features=64, hidden=[256, 128], num_classes=10).eval()
    pruned = prune(model, Unstructured(0.8, global_pruning=global_pruning), example_inputs=X)
    layers = [pruned.fc0, pruned.fc1]
    if global_pruning:
        zeros = sum(int((m.weight == 0).sum()) for m in layers)
        assert zeros == round(0.8 * sum(m.weight.numel() for m in layers))
    else:
        assert all(int((m.weight == 0).sum()) == round(0.8 * m.weight.numel()) for m in layers)
    assert int((pruned.classifier.weight == 0).sum()) == 0  # protected
    for before, after in [(model.fc0.weight, pruned.fc0.weight), (model.fc1.weight, pruned.fc1.weight)]:
        kept = after != 0  # every kept weight outweighs every dropped one, and is unchanged
        assert before.abs()[kept].min() >= before.abs()[~kept].max()
        assert torch.equal(after[kept], before[kept])
    for module in pruned.modules():  # no masks, hooks or reparametrizations left behind
        assert not module._forward_pre_hooks and not module._forward_hooks
        assert set(module._parameters) <= {"weight", "bias"} and not module._buffers
    dense = artifacts.save(model, tmp_path / "dense.pt").stat().st_size
    sparse_path = artifacts.save(pruned, tmp_path / "sparse.pt")
    assert sparse_path.stat().st_size <= 0.35 * dense
    assert torch.equal(artifacts.load(sparse_path)(X), pruned(X))


def test_magnitude_masks_drop_the_smallest():
    a, b = torch.tensor([[0.1, -5.0], [3.0, -0.2]]), torch.tensor([0.05, 4.0, -1.0])
    per_layer = magnitude_masks([a, b], 0.5)
    assert per_layer[0].tolist() == [[0, 1], [1, 0]] and per_layer[1].tolist() == [0, 1, 0]  # round(1.5)=2
    together = magnitude_masks([a, b], 3 / 7, global_pruning=True)
    assert together[0].tolist() == [[0, 1], [1, 0]] and together[1].tolist() == [0, 1, 1]


@pytest.mark.parametrize("shape", [(100,), (7, 13), (3, 5, 3, 3)])
def test_sparse_encoding_round_trips_exactly(shape):
    values = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    values[torch.rand(shape, generator=torch.Generator().manual_seed(1)) < 0.8] = 0
    values.view(-1)[3] = float("nan")
    encoded = sparse.encode_sparse(values)
    assert isinstance(encoded, dict) and encoded["values"].numel() == int((values != 0).sum())
    decoded = sparse.decode_sparse(encoded)
    assert decoded.shape == values.shape and torch.equal(decoded.nan_to_num(7.0), values.nan_to_num(7.0))
    assert sparse.encode_sparse(torch.randn(shape)) is not None
    assert isinstance(sparse.encode_sparse(torch.randn(100)), torch.Tensor)  # dense stays dense
    assert isinstance(sparse.encode_sparse(torch.zeros(100, dtype=torch.long)), torch.Tensor)


def test_corrupt_sparse_tensor_is_a_clear_error(tmp_path):
    encoded = sparse.encode_sparse(torch.zeros(256))
    encoded["values"] = torch.ones(3)
    with pytest.raises(ArtifactError, match="corrupt sparse tensor"):
        sparse.decode_sparse(encoded)


def test_iterative_unstructured_finetuning_keeps_zeros(digits):
    torch.manual_seed(0)
    model = build_model("mlp", in_features=64, hidden=[128], num_classes=10)
    fit(model, digits, TrainConfig(epochs=4, progress=False, device="cpu"))
    pruned = prune(model, Unstructured(0.8, steps=2), data=digits, finetune=finetune(2))
    assert abs(int((pruned.fc0.weight == 0).sum()) - 0.8 * pruned.fc0.weight.numel()) <= 1
    assert accuracy(pruned, digits.test) > accuracy(model, digits.test) - 0.03


def test_iterative_taylor_with_finetuning_and_teacher(digits):
    torch.manual_seed(0)
    model = build_model("mlp", in_features=64, hidden=[128, 64])
    fit(model, digits, TrainConfig(epochs=5, progress=False, device="cpu"))
    one_shot = prune(model, Structured(0.5, importance="taylor"), data=digits)
    taylor = Structured(0.5, importance="taylor", steps=2)
    tuned = prune(model, taylor, data=digits, finetune=finetune(1), teacher=model)
    assert tuned.fc0.out_features == one_shot.fc0.out_features == 64
    assert all(p.grad is None for p in tuned.parameters())
    assert accuracy(tuned, digits.test) > max(0.8, accuracy(one_shot, digits.test) + 0.1)
    assert provenance.metadata_of(tuned)["pruning"]["distilled"] is True


def test_activation_importance_removes_the_neuron_the_data_never_uses():
    model = build_model("mlp", in_features=4, hidden=[4], num_classes=2).eval()
    with torch.no_grad():
        model.fc0.weight.copy_(torch.eye(4) * torch.tensor([[10.0], [1.0], [2.0], [3.0]]))
        model.fc0.bias.copy_(torch.tensor([-100.0, 0.0, 0.0, 0.0]))  # neuron 0: the largest, never active
    x = torch.rand(32, 4)
    by_magnitude = prune(model, Structured(0.25, importance="l2"), example_inputs=x)
    by_activation = prune(model, Structured(0.25, importance="activation"), example_inputs=x)
    assert by_magnitude.fc0.out_features == by_activation.fc0.out_features == 3
    assert torch.equal(by_activation(x), model(x))  # the dead neuron went: nothing changed
    assert not torch.allclose(by_magnitude(x), model(x))  # magnitude kept it and removed a live one
    with pytest.raises(ConfigError, match="needs example inputs"):
        prune(build_model("mlp", hidden=[16]), Structured(0.5, importance="activation"))


def test_activation_importance_prunes_conv1d_channels_and_leaves_no_scores_behind():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(2, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv1d(16, 16, 3, padding=1),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(16, 3),
    ).eval()
    x = torch.randn(32, 2, 8)
    pruned = prune(model, Structured(0.5, importance="activation"), example_inputs=x)
    by_magnitude = prune(model, Structured(0.5, importance="l2"), example_inputs=x)
    assert pruned[0].out_channels == pruned[2].out_channels == 8
    assert [m.weight.shape for m in pruned if hasattr(m, "weight")] == [
        m.weight.shape for m in by_magnitude if hasattr(m, "weight")
    ]
    assert pruned(x).shape == (32, 3)
    assert not any(hasattr(m, "_importance") for m in pruned.modules())


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"ratio": 0.0}, ConfigError, "between 0 and 1"),
        ({"ratio": 1.0}, ConfigError, "between 0 and 1"),
        ({"ratio": -0.5}, ConfigError, "between 0 and 1"),
        ({"importance": "taylor"}, ConfigError, "needs data"),
        ({"importance": "bn"}, ConfigError, "batch-norm"),
        ({"importance": "random"}, ConfigError, "l1, l2, bn, taylor, activation"),
        ({"target": "latency", "kind": "unstructured"}, ConfigError, "need structured"),
        ({"protect": ["fc9"]}, ConfigError, "no such layer 'fc9'|layer 'fc9'"),
        ({"finetune_epochs": 1}, ConfigError, "needs data"),
    ],
)
def test_bad_options_are_clear_errors(kwargs, error, message):
    model = build_model("mlp", hidden=[16])
    fields = {"ratio": 0.5, **kwargs}
    epochs = fields.pop("finetune_epochs", 0)
    with pytest.raises(error, match=message) as info:
        prune(model, method_from(fields), example_inputs=X, finetune=finetune(epochs) if epochs else None)
    assert "\n" not in str(info.value)


def test_untraceable_model_names_the_layer():
    with pytest.raises(ModelError, match="layer 'fc0'"):
        prune(build_model("mlp", hidden=[16]), 0.5, example_inputs=torch.randn(2, 3))


class Shift(nn.Module):
    """Adds a fixed 16-wide offset: a shape torch-pruning cannot see, so pruning 'fc' breaks it."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("offset", torch.ones(16))

    def forward(self, x):
        return x + self.offset


def test_pruning_that_breaks_the_forward_names_the_layer():
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), Shift(), nn.Linear(16, 10)
    )
    with pytest.raises(ModelError, match=r"after pruning in layer '4' \(Shift\)"):
        prune(model, 0.5, example_inputs=X)
    assert prune(model, Structured(0.5, protect=["3"]), example_inputs=X)[1].out_features == 16


def test_nothing_prunable_is_a_clear_error():
    model = build_model("mlp", hidden=[])
    with pytest.raises(ModelError, match="nothing to prune"):
        prune(model, 0.5, example_inputs=X)
    with pytest.raises(ModelError, match="nothing to prune"):
        prune(model, Unstructured(0.5), example_inputs=X)


def test_sparsity_counts_zeros():
    model = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.0, 1.0, 0.0, 2.0], [0.0, 0.0, 3.0, 0.0]]))
    assert sparsity(model) == 5 / 8


def test_cli_prune_prints_before_after_and_saves(tmp_path, capsys):
    from keiryo.cli import main  # here: the CLI is not what the other tests exercise

    torch.manual_seed(0)
    model = build_model("cnn", width=8, blocks=1)
    source = artifacts.save(model, tmp_path / "cnn.pt", metadata={"input_shape": [1, 8, 8]})
    out = tmp_path / "small.pt"
    code = main([
        "prune", str(source), "--ratio", "0.5", "--out", str(out), "--threads", "1"
    ])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "keiryo prune" in captured.out and "pruned" in captured.out and "speed-up" in captured.out
    assert artifacts.load(out).stem[0].out_channels == 4
    code = main(["prune", str(source), "--ratio", "2"])
    assert code == 2 and "between 0 and 1" in capsys.readouterr().err


def test_check_options_and_max_ratio_refuse_before_any_work():
    taylor = Structured(0.5, importance="taylor")
    assert check_options(taylor, finetune(2), has_data=True, has_teacher=True) is taylor
    assert check_options(0.5) == Structured(ratio=0.5)  # a float is a structured ratio
    for call, message in (
        (lambda: check_options(1.0), "between 0 and 1"),
        (lambda: check_options(Structured(0.5, importance="taylor"), has_data=False), "taylor"),
        (lambda: check_options(0.5, finetune(1), has_data=False), "fine-tuning needs data"),
        (lambda: check_options(0.5, has_teacher=True), "finetune="),
        (lambda: check_options(Structured(0.5, steps=0)), "steps"),
        (lambda: check_options("0.5"), "ratio or a Structured/Unstructured config"),
    ):
        with pytest.raises(ConfigError, match=message):
            call()
    model = build_model("mlp", in_features=64, hidden=[8, 4], num_classes=10)
    assert max_ratio(model, X) == pytest.approx(0.75, abs=1e-5)  # the 4-wide layer keeps one neuron


# --- inputs as PyTorch passes them, and Hugging Face models -------------------------------------------------


class TwoInputs(nn.Module):
    """Features and a per-sample scale, as two arguments: the output is the scaled features' classes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc0 = nn.Linear(8, 32)
        self.fc1 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> dict[str, torch.Tensor]:
        hidden = torch.relu(self.fc1(torch.relu(self.fc0(x)) * scale[:, None]))
        return {"logits": self.head(hidden)}


def test_examples_may_be_a_tuple_of_arguments_or_a_dict_of_them():
    torch.manual_seed(0)
    model = TwoInputs().eval()
    x, scale = torch.randn(16, 8), torch.rand(16) + 0.5
    by_args = prune(model, 0.5, example_inputs=(x, scale))
    by_kwargs = prune(model, 0.5, example_inputs={"x": x, "scale": scale})
    for pruned in (by_args, by_kwargs):
        assert (
            pruned.fc0.out_features == 16 and pruned.fc1.out_features == 8 and pruned.head.out_features == 3
        )
        assert pruned(x, scale)["logits"].shape == (16, 3)
    assert torch.equal(by_args(x, scale)["logits"], by_kwargs(x, scale)["logits"])
    sparse_ = prune(model, Unstructured(0.5), example_inputs=(x, scale))
    assert int((sparse_.fc0.weight == 0).sum()) == 0.5 * sparse_.fc0.weight.numel()


class DictSamples(torch.utils.data.Dataset):
    """Samples as Hugging Face datasets yield them: {"x": ..., "scale": ..., "labels": ...}."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.scale = torch.randn(n, 8, generator=g), torch.rand(n, generator=g) + 0.5
        self.labels = (self.x[:, 0] > 0).long()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "scale": self.scale[i], "labels": self.labels[i]}


@pytest.mark.parametrize("importance", ["taylor", "activation"])
def test_data_of_dict_samples_scores_and_traces(importance):
    torch.manual_seed(0)
    model = TwoInputs().eval()
    pruned = prune(model, Structured(0.5, importance=importance), data=DictSamples(64))  # no example given
    assert pruned.fc0.out_features == 16 and pruned.fc1.out_features == 8
    assert pruned(torch.randn(4, 8), torch.ones(4))["logits"].shape == (4, 3)


def test_raw_bert_model_pruned_with_ids_and_mask():
    model = tiny_bert(vocab=100, hidden=64, layers=2, heads=4, positions=32)
    ids, mask = torch.randint(0, 100, (2, 12)), torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    pruned = prune(model, 0.5, example_inputs=(ids, mask))
    assert params(pruned) <= 0.6 * params(model)
    out, before = pruned(ids, mask), model(ids, mask)
    assert out.last_hidden_state.shape == before.last_hidden_state.shape == (2, 12, 64)
    assert out.pooler_output.shape == before.pooler_output.shape
    for layer in pruned.encoder.layer:
        attention = layer.attention.self
        assert attention.num_attention_heads == 2 and attention.query.out_features == 2 * 16
        assert layer.attention.output.dense.in_features == 32 and layer.intermediate.dense.out_features == 64
    assert pruned.config.num_attention_heads == 2 and pruned.config.intermediate_size == 64


def _decoder(family: str):
    """A small causal LM of `family` with random weights (no download): 4 heads, 2 key/value groups."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=32, bos_token_id=0, eos_token_id=0
        )
        return transformers.GPT2LMHeadModel(config).eval()
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[family]
    config = config_class(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=32, tie_word_embeddings=True,
    )  # fmt: skip
    return model_class(config).eval()


def _tokens() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "mistral"])
def test_decoders_lose_heads_with_their_groups_and_still_generate(family, tmp_path):
    model, tokens = _decoder(family), _tokens()
    started = time.perf_counter()
    pruned = prune(model, 0.5, example_inputs=tokens)
    assert time.perf_counter() - started < 30
    assert params(pruned) <= 0.6 * params(model)
    assert pruned(**tokens).logits.shape == model(**tokens).logits.shape == (2, 10, 128)
    assert pruned.lm_head.weight is pruned.get_input_embeddings().weight  # tied weights stay tied
    generated = pruned.generate(tokens["input_ids"][:1, :4], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 8)
    loaded = artifacts.load(artifacts.save(pruned, tmp_path / "pruned.pt"))
    assert torch.equal(loaded(**tokens).logits, pruned(**tokens).logits)
    if family == "gpt2":  # one fused Conv1D: query, key and value thirds keep the same 2 heads
        # (GPT-2's config has no head_dim, so from_pretrained cannot say "2 heads of 16 in a 64-wide model")
        for block in pruned.transformer.h:
            assert block.attn.num_heads == 2 and block.attn.split_size == 32
            assert block.attn.c_attn.weight.shape == (64, 96) and block.attn.c_proj.weight.shape == (32, 64)
            assert block.mlp.c_fc.weight.shape == (64, 128)
        assert pruned.config.n_head == 2 and pruned.config.n_inner == 128
        return
    config = pruned.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (2, 1, 64)
    for layer in pruned.model.layers:  # one key/value group left, with both query heads that read it
        attention = layer.self_attn
        assert attention.q_proj.out_features == 32 and attention.k_proj.out_features == 16
        assert attention.v_proj.out_features == 16 and attention.o_proj.in_features == 32
        assert attention.num_key_value_groups == 2 and layer.mlp.gate_proj.out_features == 64
    pruned.save_pretrained(tmp_path / "hf")
    reloaded = type(pruned).from_pretrained(tmp_path / "hf").eval()
    assert torch.equal(reloaded(**tokens).logits, pruned(**tokens).logits)
    assert reloaded.lm_head.weight is reloaded.get_input_embeddings().weight


def test_decoder_group_that_does_nothing_is_the_one_removed():
    """Key/value group 1 (query heads 2 and 3) and half the feed-forward neurons are zero: removing exactly
    those changes no output, so the logits stay the same."""
    model, tokens = _decoder("llama"), _tokens()
    with torch.no_grad():
        for layer in model.model.layers:
            attention, mlp = layer.self_attn, layer.mlp
            attention.q_proj.weight[32:] = 0
            attention.k_proj.weight[16:] = 0
            attention.v_proj.weight[16:] = 0
            attention.o_proj.weight[:, 32:] = 0
            mlp.gate_proj.weight[::2] = 0
            mlp.up_proj.weight[::2] = 0
            mlp.down_proj.weight[:, ::2] = 0
    pruned = prune(model, 0.5, example_inputs=tokens)
    assert torch.allclose(pruned(**tokens).logits, model(**tokens).logits, atol=1e-5)
    with pytest.raises(ConfigError, match="use l1 or l2"):
        prune(model, Structured(0.5, importance="activation"), example_inputs=tokens)
    with pytest.raises(ConfigError, match="one head count"):
        prune(model, Structured(0.5, global_pruning=True), example_inputs=tokens)


def test_a_dependency_graph_that_does_not_finish_names_the_layer(monkeypatch):
    """A graph torch-pruning cannot group in bounded time ends with one line naming the layer, not a hang."""
    import torch_pruning as tp

    from keiryo.compress import prune_graph

    grouping = tp.DependencyGraph.get_pruning_group

    def get_pruning_group(self, module, *args, **kwargs):
        time.sleep(0.5)  # as if torch-pruning looped while grouping `module`
        return grouping(self, module, *args, **kwargs)

    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", get_pruning_group)
    monkeypatch.setattr(prune_graph, "GRAPH_SECONDS", 0.2)
    started = time.perf_counter()
    with pytest.raises(ModelError, match=r"did not finish in 0.2 s at layer 'fc0' \(Linear\)") as info:
        prune(build_model("mlp", hidden=[16]), 0.5, example_inputs=X)
    assert "\n" not in str(info.value) and time.perf_counter() - started < 5
