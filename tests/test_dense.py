import pytest
import torch
import torch.nn.functional as F

from experts import DenseFFN


@pytest.mark.parametrize("activation,bias", [("gelu", True), ("relu", False)])
def test_forward_is_linear_act_linear(activation, bias):
    torch.manual_seed(0)
    layer = DenseFFN(6, 10, activation=activation, bias=bias).double()
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    act = F.gelu if activation == "gelu" else F.relu
    h = x @ layer.fc.weight.t() + (layer.fc.bias if bias else 0)
    expected = act(h) @ layer.proj.weight.t() + (layer.proj.bias if bias else 0)
    assert torch.allclose(layer(x), expected, rtol=0, atol=1e-12)
    assert (layer.fc.bias is None) == (not bias)


def test_interface_and_counts():
    layer = DenseFFN(4, 6)
    assert float(layer.aux_loss()) == 0.0 and layer.aux_metrics() == {}
    # fc 2*4*6 + act 6 + proj 2*6*4 + biases 6 + 4
    assert layer.flops_per_token() == 48 + 6 + 48 + 10
    assert layer.num_params() == layer.active_params_per_token() == 4 * 6 + 6 + 6 * 4 + 4
    nobias = DenseFFN(4, 6, bias=False)
    assert nobias.flops_per_token() == 102 and nobias.num_params() == 48


def test_dropout_on_output():
    layer = DenseFFN(4, 8, dropout=0.5)
    x = torch.randn(64, 4)
    layer.eval()
    y_eval = layer(x)
    layer.train()
    y_train = layer(x)
    kept = y_train != 0
    assert (~kept).any() and torch.allclose(y_train[kept], 2 * y_eval[kept])


@pytest.mark.parametrize("kwargs,match", [
    ({"activation": "swish"}, r"activation='swish' is not valid; choose one of 'gelu', 'relu'"),
    ({"hidden": 0}, "hidden must be an int >= 1"),
    ({"dim": 2.5}, "dim must be an int"),
    ({"dropout": -0.1}, r"dropout must be a float in \[0, 1\)"),
])
def test_bad_arguments_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DenseFFN(**(dict(dim=4, hidden=8) | kwargs))


def test_wrong_input_dim_refused():
    with pytest.raises(ValueError, match="dim=4"):
        DenseFFN(4, 8)(torch.randn(2, 5))
