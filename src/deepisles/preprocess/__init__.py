"""Preprocessing: ADC units, resampling, FLAIR registration, brain masks."""
