"""The report of an unlearning grid, in layers: ``query`` (MLflow runs -> one row per measurement),
``aggregate`` (rows -> cells and mean rows), ``render`` (markdown and CSV) and ``figures`` (plots).

The command itself is :mod:`potion.report` (``python -m potion.report``).
"""
