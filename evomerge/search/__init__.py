"""Search: genome encoding, samplers and the archive of evaluated recipes."""
