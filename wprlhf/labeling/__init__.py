"""Human labeling: a SQLite store of comparisons and labels (`store`) and the web page that collects them (`app`).

Imports no other wprlhf module and no torch: the page runs on a machine without a model. `store` needs only the
standard library; `app` needs fastapi and uvicorn.
"""

from .store import LabelingError, StaleComparison, Store, UnknownComparison, UnknownSession, read_samples

__all__ = ["LabelingError", "StaleComparison", "Store", "UnknownComparison", "UnknownSession", "read_samples"]
