"""The four stages (load, chunk, embed, write), the worker runtime, the janitor and the embedded runner."""
