"""How figures read in the table: short, never in scientific notation."""

from __future__ import annotations

import pytest

from services.capacity.report import _n


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (4.5, "4.5"),
        (231.48, "231"),
        (9_722.2, "9,722"),
        (92_592.6, "92.6k"),
        (999_999, "1,000k"),
        (10_000_000, "10M"),
        (2.5e12, "2,500B"),
    ],
)
def test_magnitudes_read_plainly(value: float, shown: str) -> None:
    assert _n(value) == shown
