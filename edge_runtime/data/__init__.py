"""Data sets as in-memory uint8 arrays, splits for 9+1, and the unlabeled stream.

`load_split` is the one way in: it reads any catalog data set (digits, CIFAR-10, MNIST,
Fashion-MNIST, Tiny ImageNet, an image folder) from its catalog location or a given path, in any
supported on-disk layout, and caches decoded tarballs. `split_novel_class` and `build_stream`
turn loaded sets into the 9+1 benchmark's parts.
"""

from edge_runtime.data.arrays import UNLABELED, ImageSet
from edge_runtime.data.catalog import CATALOG, SHARED_DATA
from edge_runtime.data.loader import load_split
from edge_runtime.data.splits import NovelClassSplit, build_stream, split_novel_class

__all__ = ["CATALOG", "SHARED_DATA", "UNLABELED", "ImageSet", "NovelClassSplit", "build_stream", "load_split",
           "split_novel_class"]
