"""The demo: a dg defs folder (``defs/``, loaded by ``amp_dagster.definitions``), its settings, and ``make demo``
(``python -m amp_dagster.demo``), which runs the code location headless against a local amp."""
