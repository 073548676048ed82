"""Simulation-based inference of beam parameters from knife-edge scans: data, job, plots."""
