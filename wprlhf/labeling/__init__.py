"""Human labeling: a SQLite store of comparisons and labels (`store`), the web page that collects them (`app`), and
agreement between labelers (`agreement`: Cohen's and Fleiss' kappa) for the lead's view.

Imports no other wprlhf module and no torch: the page runs on a machine without a model. `store` and `agreement`
need only the standard library; `app` needs fastapi and uvicorn.
"""

from .agreement import agreement_report, cohen_kappa, fleiss_kappa
from .store import LabelingError, StaleComparison, Store, UnknownComparison, UnknownSession, read_samples

__all__ = ["LabelingError", "StaleComparison", "Store", "UnknownComparison", "UnknownSession", "agreement_report",
           "cohen_kappa", "fleiss_kappa", "read_samples"]
