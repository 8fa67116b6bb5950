"""logitstore: a teacher's top-k soft labels, captured once, stored compressed and exact.

`import logitstore` does not import torch; the capture engine (logitstore.capture) does.
"""

from logitstore.errors import LogitStoreError
from logitstore.reader import Store, TokenBlock, open_store
from logitstore.schema import StoreMeta

__version__ = "0.1.0"

__all__ = ["LogitStoreError", "Store", "StoreMeta", "TokenBlock", "__version__", "open_store"]
