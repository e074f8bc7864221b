"""Data sets as in-memory uint8 arrays, splits for 9+1, and the unlabeled stream."""
