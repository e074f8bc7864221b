"""Continual learning: the rehearsal memory and the 9+1 router."""
