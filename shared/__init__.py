"""Code shared by the producer and the workers: settings, messages, keys, store and ledger."""
