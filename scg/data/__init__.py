"""Data sets for scg's examples and benchmarks: MNIST, binarized MNIST, minibatches."""

from scg.data.errors import DataError as DataError
from scg.data.idx import read_idx as read_idx
from scg.data.mnist import MNIST as MNIST
from scg.data.mnist import batches as batches
from scg.data.mnist import data_dir_from as data_dir_from
from scg.data.mnist import load_binarized_mnist as load_binarized_mnist
from scg.data.mnist import load_mnist as load_mnist
