"""Weighting molecular-dynamics frames against diffuse scattering: data, job, plots."""
