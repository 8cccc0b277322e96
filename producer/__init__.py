"""The client side: the CLI, the light client (producer/client.py: no stage, torch or numpy), reading
sources, the model lifecycle and model comparison."""
