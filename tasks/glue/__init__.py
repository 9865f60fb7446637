"""GLUE sentence-pair classification (MNLI, QQP) from GLUE's TSV files."""
