import pytest

from dittune.engine.budget import BudgetError, format_bytes, parse_budget

GiB = 2**30


@pytest.mark.parametrize("text, total, expected", [
    ("24GiB", None, 24 * GiB), ("24G", None, 24 * GiB), ("24gib", None, 24 * GiB), ("24000MiB", None, 24000 * 2**20),
    ("24GB", None, 24 * 10**9), ("1.5GiB", None, int(1.5 * GiB)), (" 16 GiB ", None, 16 * GiB),
    ("0.5", 80 * GiB, 40 * GiB), ("80%", 80 * GiB, 64 * GiB), ("1", 80 * GiB, 80 * GiB), ("100%", 10, 10),
])
def test_valid_budgets(text, total, expected):
    assert parse_budget(text).resolve(total) == expected


@pytest.mark.parametrize("text", ["", "abc", "24 parsecs", "-1GiB", "0", "0GiB", "1.5", "150%", "0%", "24GiB extra", "nan", "1e3"])
def test_malformed_budgets_are_clear_errors(text):
    with pytest.raises(BudgetError) as e:
        parse_budget(text)
    assert "\n" not in str(e.value) and "budget" in str(e.value).lower()


def test_fraction_needs_card_size():
    with pytest.raises(BudgetError, match="fraction"):
        parse_budget("50%").resolve(None)


def test_format_bytes():
    assert format_bytes(24 * GiB) == "24.00 GiB" and format_bytes(None) == "-" and format_bytes(512) == "512 B"
