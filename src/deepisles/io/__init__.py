"""Reading, validating and atomically writing images; knows nothing about models."""
