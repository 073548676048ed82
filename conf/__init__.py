"""Hydra configuration of the ``physppl`` command; importing it registers the generated options."""
from physppl.configs import register

register()
