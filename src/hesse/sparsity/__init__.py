"""Sparsity detection: trace a function to ATen ops and propagate index patterns."""
