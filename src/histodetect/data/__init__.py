"""Data: ingest raw patches into the packed store, read it back, split it, augment batches."""
