"""The shared float comparison: round-off of other kernels passes, real errors still fail."""

import pytest
import torch
from helpers import assert_all_rel_close, assert_rel_close, rel_diff


def _pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(64, 256, generator=g), torch.randn(256, 32, generator=g)
    return (x @ w), (x.double() @ w.double())  # float32 kernels vs float64: round-off only


def test_round_off_of_another_kernel_passes():
    single, double = _pair()
    assert 0 < rel_diff(single, double) < 1e-6
    assert_rel_close(single, double)
    # The case that failed on a fresh machine: 1.05e-5 on one element of a tensor whose largest element is 16.7.
    expected = torch.full((10,), 0.5)
    expected[0] = 16.7
    actual = expected.clone()
    actual[3] += 1.05e-5
    assert_rel_close(actual, expected)
    assert not torch.allclose(actual, expected, atol=1e-6, rtol=1e-5)  # what the element-wise check said


@pytest.mark.parametrize("error", ["scale", "missing term", "dropped chunk", "sign", "shape", "nan"])
def test_real_errors_still_fail(error):
    single, double = _pair()
    if error == "scale":
        wrong = single * 1.001  # e.g. a temperature off by 0.1%
    elif error == "missing term":
        wrong = single - 0.01 * _pair(seed=1)[0]  # one small term of a sum left out
    elif error == "dropped chunk":
        wrong = single.clone()
        wrong[-8:] = 0  # the last mini-batch's rows never computed
    elif error == "sign":
        wrong = single.clone()
        wrong[5, 7] = -wrong[5, 7]
    elif error == "shape":
        wrong = single[:-1]
    else:
        wrong = single.clone()
        wrong[0, 0] = float("nan")
    with pytest.raises(AssertionError):
        assert_rel_close(wrong, double)


def test_dicts_compare_each_tensor_with_a_floor_from_the_largest():
    big, _ = _pair()
    zero_grad = torch.zeros(4)  # mathematically zero: only round-off of the size of the other gradients
    expected = {"weight": big, "key_bias": zero_grad}
    actual = {"weight": big.clone(), "key_bias": zero_grad + 1e-8 * float(big.abs().max())}
    assert_all_rel_close(actual, expected)
    actual["key_bias"] = zero_grad + 0.05 * float(big.abs().max())  # a real gradient where none should be
    with pytest.raises(AssertionError, match="key_bias"):
        assert_all_rel_close(actual, expected)
    with pytest.raises(AssertionError):
        assert_all_rel_close({"weight": big}, expected)  # a tensor missing altogether
