"""The shared argument checks of gradkit._validate: values they accept, and errors that name the argument,
the value and what is expected."""
import numpy as np
import pytest
import torch

from gradkit._validate import (ArgumentError, boolean, choice, integer, is_int, is_real, nonneg_int,
                               optional_generator, positive, positive_int, probability, real_in, real_scalar,
                               tensor)


def test_integer_accepts_python_and_numpy_ints_and_returns_a_python_int():
    assert integer("n", 3) == 3 and type(integer("n", np.int64(3))) is int
    assert integer("n", 0, low=0, high=0) == 0 and integer("n", -5) == -5


@pytest.mark.parametrize("call, message", [
    (lambda: integer("size", 1, low=2), "size must be an int >= 2, got 1"),
    (lambda: integer("stage", 4, low=1, high=3), r"stage must be an int in \[1, 3\], got 4"),
    (lambda: integer("k", 9, high=8), "k must be an int <= 8, got 9"),
    (lambda: integer("k", 1.5), "k must be an int, got float 1.5"),
    (lambda: integer("k", True), "k must be an int, got bool True"),
    (lambda: integer("k", "3", low=0), "k must be an int >= 0, got str '3'"),
    (lambda: positive_int("hidden", 0), "hidden must be a positive int, got 0"),
    (lambda: positive_int("hidden", 2.0), "hidden must be a positive int, got float 2.0"),
    (lambda: nonneg_int("seed", -3), "seed must be a non-negative int, got -3"),
])
def test_integer_errors(call, message):
    with pytest.raises(ArgumentError, match=message) as info:
        call()
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)


def test_predicates():
    assert is_int(3) and is_int(np.int32(3), low=0, high=3) and not is_int(True) and not is_int(3.0)
    assert not is_int(-1, low=0) and not is_int(4, high=3)
    assert is_real(0.5) and is_real(2) and not is_real(True) and not is_real(float("nan")) and not is_real("1")


@pytest.mark.parametrize("call, message", [
    (lambda: real_in("p", 1.5, 0, 1, high_open=True), r"p must be in \[0, 1\), got 1.5"),
    (lambda: real_in("eps", 0.0, 0, low_open=True), "eps must be > 0, got 0.0"),
    (lambda: real_in("x", -1, 0), "x must be >= 0, got -1"),
    (lambda: real_in("x", 2, high=1), "x must be <= 1, got 2"),
    (lambda: real_in("x", float("nan"), 0, 1), "x must be finite, got nan"),
    (lambda: positive("lr", 0), "lr must be finite and > 0, got 0"),
    (lambda: positive("lr", "a"), "lr must be a real number, got str 'a'"),
    (lambda: probability("p", -0.1), r"p must be in \[0, 1\], got -0.1"),
    (lambda: real_scalar("eta", -1, nonneg=True), "eta must be finite and >= 0, got -1"),
])
def test_real_errors(call, message):
    with pytest.raises(ArgumentError, match=message):
        call()


def test_reals_accept_numbers_and_one_element_tensors():
    assert real_in("p", 0.25, 0, 1) == 0.25 and probability("p", torch.tensor(1.0)) == 1.0
    assert positive("lr", np.float32(0.5)) == 0.5
    with pytest.raises(ArgumentError, match="must be a real number"):
        positive("lr", torch.tensor(0.5), tensor_ok=False)


def test_boolean_choice_generator():
    assert boolean("hard", False) is False
    with pytest.raises(ArgumentError, match="hard must be a bool, got int 1"):
        boolean("hard", 1)
    assert choice("mode", "a", ("a", "b")) == "a"
    with pytest.raises(ArgumentError, match=r"mode must be one of \('a', 'b'\), got 'c'"):
        choice("mode", "c", ["a", "b"])
    with pytest.raises(ArgumentError, match=r"mode must be one of \('a', 'b'\), got \[1\]"):
        choice("mode", [1], ("a", "b"))   # an unhashable value is just another wrong value
    g = torch.Generator()
    assert optional_generator(g) is g and optional_generator(None) is None
    with pytest.raises(ArgumentError, match="generator must be a torch.Generator or None, got int"):
        optional_generator(0)


def test_tensor():
    x = torch.zeros(2, 3)
    assert tensor("x", x, floating=True, finite=True, min_dim=2) is x
    with pytest.raises(ArgumentError, match="x must be a torch.Tensor, got list"):
        tensor("x", [1.0])
    with pytest.raises(ArgumentError, match="x must be a floating-point tensor, got dtype torch.int64"):
        tensor("x", torch.zeros(2, dtype=torch.long), floating=True)
    with pytest.raises(ArgumentError, match=r"x must have at least 2 dims, got shape \(3,\)"):
        tensor("x", torch.zeros(3), min_dim=2)
    with pytest.raises(ArgumentError, match=r"x must be finite, got 2 non-finite value\(s\)"):
        tensor("x", torch.tensor([0.0, float("nan"), float("inf")]), finite=True)
