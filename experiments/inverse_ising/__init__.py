"""The inverse Ising problem: couplings and fields from spin samples, with posteriors."""
