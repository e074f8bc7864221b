"""Novelty detectors behind one fit/score interface."""
