"""Tests of fastpatch.optim (a package so its test_adam.py does not clash with tests/ops/test_adam.py)."""
