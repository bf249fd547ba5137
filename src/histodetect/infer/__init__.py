"""Using a run: predict, evaluate, explain, export."""
