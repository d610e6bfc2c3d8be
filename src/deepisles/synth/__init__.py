"""Synthetic acute-stroke MRI cases (DWI, ADC, FLAIR, lesion mask) in the ISLES'22 layout.

Built from real anatomy (nilearn's MNI152 2009 GM/WM/brain maps), with territory-shaped infarcts, a
mono-exponential diffusion model, random acquisition geometry, Rician noise and bias fields. See
docs/realism.md for how the output compares with a real ISLES'22 case.
"""

from deepisles.synth.generator import SynthCase, case_rng, generate_case, write_dataset

__all__ = ["SynthCase", "case_rng", "generate_case", "write_dataset"]
