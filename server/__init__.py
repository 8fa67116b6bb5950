"""The logitstore service: corpora, capture jobs, store catalog, sharing (issue 7)."""
