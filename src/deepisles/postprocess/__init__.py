"""Post-processing of the ensemble mask: connected lesions and their measurements."""
