"""Fitting IDD statistics: streaming class moments, shrunk precisions, tied Gaussians, thresholds."""
