"""Restricted Boltzmann machines: on digits or any binary arrays, and per temperature on Ising data (Torlai & Melko)."""
