"""Numerical comparison helpers for the tests."""
import torch


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||, computed in float64."""
    actual, expected = actual.double(), expected.double()
    denom = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close_relative(actual, expected, tol: float, what: str = "tensor") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = relative_error(actual, expected)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def assert_within_factor_of_torch(fused, torch_same_precision, reference, what: str,
                                  factor: float = 4.0, floor: float = 1e-6) -> None:
    """flash-attention's rule: the fused op's error against an fp32/fp64 reference is at most
    ``factor`` times the error of plain PyTorch at the same precision (plus a tiny floor for
    when PyTorch happens to be exact)."""
    fused_err = relative_error(fused, reference)
    torch_err = relative_error(torch_same_precision, reference)
    assert torch.isfinite(fused).all(), f"{what}: non-finite values"
    assert fused_err <= factor * torch_err + floor, (
        f"{what}: fused error {fused_err:.3e} > {factor} x torch error {torch_err:.3e}")
