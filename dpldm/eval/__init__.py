"""Measuring a run: downstream classifiers, DP-SGD baseline, FID, reports and their total privacy cost."""
