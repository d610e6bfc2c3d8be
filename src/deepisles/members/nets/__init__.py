"""Network architectures of the deep-learning members, built from the stored configuration."""
