"""Variational autoencoders on physics data (Ising configurations) and digits: data, job, plots."""
