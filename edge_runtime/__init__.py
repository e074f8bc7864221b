"""edge_runtime: notice novel inputs at the edge and learn them as one extra class."""

__version__ = "0.1.0"
