"""Data sets for scg's examples and benchmarks: MNIST, binarized MNIST, minibatches."""

from scg.datasets.batching import batches as batches
from scg.datasets.errors import DataError as DataError
from scg.datasets.idx import read_idx as read_idx
from scg.datasets.mnist import MNIST as MNIST
from scg.datasets.mnist import data_dir_from as data_dir_from
from scg.datasets.mnist import load_binarized_mnist as load_binarized_mnist
from scg.datasets.mnist import load_mnist as load_mnist
