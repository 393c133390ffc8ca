"""Training, decoding, evaluation, timing and the results record."""
