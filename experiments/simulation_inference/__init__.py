"""Simulation-based inference for any simulator: ``physppl.infer_sbi``."""
