"""Reports read only from a study's results database: tables, plots, ``report.html`` and ``report.md``.

``write_report(DIR)`` is what ``widthlab report DIR`` calls; ``format_results_table(rows)`` prints the
results table of :meth:`~widthlab.studies.store.ResultStore.runs` rows in a terminal.
"""

from widthlab.report.render import write_report
from widthlab.report.tables import format_results_table

__all__ = ["format_results_table", "write_report"]
