import pytest

from lifelong.plugins import warmup_cosine


def test_warmup_is_linear_then_cosine_to_floor():
    assert warmup_cosine(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert warmup_cosine(100, 100, 10, 0.1) == pytest.approx(0.1)


def test_no_warmup():
    assert warmup_cosine(0, 10, 0, 0.0) == pytest.approx(1.0)
    values = [warmup_cosine(s, 10, 0, 0.0) for s in range(11)]
    assert all(a >= b for a, b in zip(values, values[1:]))
