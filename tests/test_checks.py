"""experts.checks: the argument validators and the activation table every layer shares."""

import pytest
import torch

from experts.checks import (ACTIVATIONS, activation_fn, check_choice, check_dropout, check_inputs, check_int,
                            check_key_dim, check_last_dim, check_optimizer, check_tokens, is_int, is_number)


def test_gelu_is_exact_erf():
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)
    assert torch.allclose(activation_fn("gelu")(x), x * 0.5 * (1 + torch.erf(x / 2 ** 0.5)), atol=1e-15)
    assert torch.equal(activation_fn("relu")(x), x.clamp(min=0))


def test_check_choice_message():
    with pytest.raises(ValueError, match=r"^mode='x' is not valid; choose one of 'a', 'b'$"):
        check_choice("mode", "x", ("a", "b"))


def test_number_predicates_refuse_bools():
    assert is_int(3) and not is_int(True) and not is_int(3.0)
    assert is_number(3) and is_number(0.5) and not is_number(False) and not is_number("1")


@pytest.mark.parametrize("call,match", [
    pytest.param(lambda: check_int("n", 0), r"^n must be an int >= 1, got 0$", id="int_zero"),
    pytest.param(lambda: check_int("n", True), "n must be an int", id="int_bool"),
    pytest.param(lambda: check_int("warmup_steps", -1, minimum=0), "warmup_steps must be an int >= 0",
                 id="int_minimum"),
    pytest.param(lambda: check_dropout(1.0), r"dropout must be a float in \[0, 1\)", id="dropout_one"),
    pytest.param(lambda: check_dropout(True), "dropout must be", id="dropout_bool"),
    pytest.param(lambda: check_key_dim(3), "key_dim must be even", id="key_dim_odd"),
    pytest.param(lambda: check_key_dim(0), "key_dim must be an int >= 2", id="key_dim_small"),
    pytest.param(lambda: check_optimizer("adamw"), "optimizer must be a torch.optim.Optimizer or None, got str",
                 id="optimizer"),
    pytest.param(lambda: check_last_dim(torch.zeros(2, 5), 4),
                 r"input's last dimension must be dim=4, got shape \(2, 5\)", id="last_dim"),
    pytest.param(lambda: check_inputs([1.0]), r"inputs must be a tensor \[..., dim\], got list", id="inputs"),
    pytest.param(lambda: check_tokens(torch.zeros(0, 4)), "inputs must hold at least one token", id="tokens"),
    pytest.param(lambda: activation_fn("swish"), "activation='swish' is not valid", id="activation"),
])
def test_validators_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_valid_arguments_pass():
    check_int("n", 1)
    check_dropout(0)
    check_key_dim(2)
    check_optimizer(None)
    check_optimizer(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1))
    check_last_dim(torch.zeros(3, 4), 4)
    check_inputs(torch.zeros(1, 4))
    check_tokens(torch.zeros(1, 4))
    assert ACTIVATIONS == ("gelu", "relu")
