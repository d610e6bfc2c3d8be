"""The validation toolkit: what the paper validated DeepISLES with, for any cohort (docs/validation.md).

* :mod:`deepisles.validation.attributes` - per-subject attributes (participants.tsv columns, DWI JSON-sidecar
  fields) of an ISLES'22 / BIDS dataset;
* :mod:`deepisles.validation.strata` - ``deepisles evaluate --by``: metrics per stratum (lesion volume, lesion
  count, any attribute) with bootstrap confidence intervals, Bland-Altman agreement of the volumes;
* :mod:`deepisles.validation.plots` - their box plots and Bland-Altman plot (matplotlib, no display needed);
* :mod:`deepisles.validation.cohort` (+ ``cohort_mni``, ``cohort_report``) - ``deepisles cohort``: lesion
  biomarkers of a batch run against NIHSS / mRS (Spearman, bootstrap CIs, expert vs model), lesion frequency map;
* :mod:`deepisles.validation.reader_study` (+ ``reader_study_analyze``, ``reader_study.html``) -
  ``deepisles reader-study build / analyze``: a blinded, offline two-mask preference study and its analysis.
"""
