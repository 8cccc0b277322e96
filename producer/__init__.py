"""Submitting documents: reading sources on the client and enqueueing them as batches. No torch here."""
