"""psq: share batch-normalization statistics across data-parallel workers without waiting.

``import psq`` never imports torch; the torch layer lives in :mod:`psq.torch`.
"""

from psq.layout import Layout
from psq.loop import WorkerLoop
from psq.protocol import ProtocolError
from psq.stats import History, Moments, blend, merge

__version__ = "0.1.0"

__all__ = ["History", "Layout", "Moments", "ProtocolError", "WorkerLoop", "__version__", "blend", "merge"]
