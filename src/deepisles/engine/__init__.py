"""Inference engine shared by all members: sliding window, test-time flips, device and precision."""
