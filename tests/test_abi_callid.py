"""CallId: the 32-bit tuple layout from the source mail."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmikit.abi.callid import CALLID_MAX, CallId, encode


@given(st.integers(min_value=0, max_value=CALLID_MAX))
def test_decode_encode_identity(value: int) -> None:
    cid = CallId.decode(value)
    assert cid.encode() == value
    for field in (cid.family, cid.call, cid.reserved, cid.annotation):
        assert 0 <= field <= 0xFF
    assert cid.without_annotation().annotation == 0
    assert cid.without_annotation().encode() == value & ~0xFF


@given(st.integers(0, 255), st.integers(0, 255), st.integers(0, 255), st.integers(0, 255))
def test_encode_decode_identity(f: int, c: int, r: int, a: int) -> None:
    cid = CallId(f, c, r, a)
    assert CallId.decode(cid.encode()) == cid


def test_field_positions() -> None:
    assert CallId(0x03, 0x00, 0x00, 0x01).encode() == 0x03000001
    assert CallId.decode(0x12345678) == CallId(0x12, 0x34, 0x56, 0x78)
    assert encode(0x03, 0x02) == 0x03020000
    assert str(CallId(3, 0, 0, 1)) == "0x03000001"


@pytest.mark.parametrize("bad", [-1, CALLID_MAX + 1, 1 << 40])
def test_decode_rejects_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError):
        CallId.decode(bad)


def test_fields_must_be_bytes() -> None:
    with pytest.raises(ValueError):
        CallId(256, 0)
    with pytest.raises(ValueError):
        CallId(0, -1)
