"""Reports: EDA, evaluation, comparison tables, as self-contained HTML."""
