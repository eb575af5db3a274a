"""The model registry: digits_mlp's size and shapes (one process, no data)."""

import pytest
import torch

from lookahead_dist.errors import ConfigError
from lookahead_dist.train.config import ModelConfig
from lookahead_dist.train.models import DigitsMLP, build_model


def test_digits_mlp_parameter_count():
    model = build_model(ModelConfig(name="digits_mlp", num_classes=10))
    assert isinstance(model, DigitsMLP)
    # 64 -> 1600 -> 1600 -> 1600 -> 1600 -> 10, weights and biases
    expected = (64 * 1600 + 1600) + 3 * (1600 * 1600 + 1600) + (1600 * 10 + 10)
    assert expected == 7_804_810
    assert sum(p.numel() for p in model.parameters()) == expected
    assert len(list(model.buffers())) == 0  # nothing that forward changes in place


def test_digits_mlp_forward_shape():
    model = DigitsMLP(num_classes=10, width=8, layers=2)
    assert model(torch.zeros(5, 1, 8, 8)).shape == (5, 10)
    assert model(torch.zeros(5, 64)).shape == (5, 10)


def test_unknown_model_names_digits_mlp():
    with pytest.raises(ConfigError, match="digits_mlp"):
        build_model(ModelConfig(name="mlp"))
