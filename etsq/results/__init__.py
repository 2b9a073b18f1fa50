"""Results a researcher reads: the per-run table, paired comparisons, the HTML report and tree view,
and the reference implementation's JSON format in and out."""
