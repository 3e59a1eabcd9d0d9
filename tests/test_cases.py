"""Every op of the case table: forward and gradients equal PyTorch's, and gradcheck passes.

Shapes and values are drawn by Hypothesis (broadcastable pairs, size-1 dims, non-contiguous views).
"""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.verify import _inputs, all_cases, check_gradients, compare, hypothesis_draw

CASES = all_cases()
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize("case", [c for c in CASES if c.torch], ids=lambda c: c.name)
@SETTINGS
@given(data=st.data())
def test_equals_pytorch(case, data):
    arrays, kwargs = _inputs(case, hypothesis_draw(data))
    r = compare(case, arrays, kwargs)
    assert r.ok, f"{case.name}: {r.message}"


@pytest.mark.parametrize("case", [c for c in CASES if c.grad and c.gradcheck], ids=lambda c: c.name)
@SETTINGS
@given(data=st.data())
def test_gradcheck(case, data):
    arrays, kwargs = _inputs(case, hypothesis_draw(data))
    check_gradients(case, arrays, kwargs)
