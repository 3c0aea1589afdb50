"""Apply a trained run to new data: the model loader (no Ray) and the predict job's Ray Data pipeline."""
