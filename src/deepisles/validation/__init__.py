"""The validation toolkit: what the paper validated DeepISLES with, for any cohort (docs/validation.md).

* :mod:`deepisles.validation.attributes` - per-subject attributes (participants.tsv columns, DWI JSON-sidecar
  fields) of an ISLES'22 / BIDS dataset;
* :mod:`deepisles.validation.strata` - ``deepisles evaluate --by``: metrics per stratum (lesion volume, lesion
  count, any attribute) with bootstrap confidence intervals, Bland-Altman agreement of the volumes;
* :mod:`deepisles.validation.plots` - their box plots and Bland-Altman plot (matplotlib, no display needed).
"""
