"""Small helpers shared by the hand-computed tests (import as `from tests.helpers import close, mask_of, t`)."""

import torch


def t(values, dtype=torch.float64):
    return torch.tensor(values, dtype=dtype)


def mask_of(rows):
    return torch.tensor(rows, dtype=torch.bool)


def close(actual, expected, atol=1e-6):
    """Assert a tensor (or number) equals nested literals, compared in float64 with a small absolute tolerance."""
    expected = torch.as_tensor(expected, dtype=torch.float64)
    actual = torch.as_tensor(actual).to(torch.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)
