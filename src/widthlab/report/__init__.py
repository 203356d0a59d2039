"""Reports read only from a study's results database: tables, plots, ``report.html`` and ``report.md``.

``write_report(DIR)`` is what ``widthlab report DIR`` calls; ``format_results_table(rows)`` prints the
results table of :meth:`~widthlab.studies.store.ResultStore.runs` rows in a terminal. For a comparison
study, ``comparison_text(DIR)`` is the verdict per task followed by the comparison tables, and
``verdict_text(DIR)`` the verdict alone.
"""

from widthlab.report.render import write_report
from widthlab.report.tables import format_results_table
from widthlab.report.verdict import comparison_text, verdict_text

__all__ = ["comparison_text", "format_results_table", "verdict_text", "write_report"]
