"""The worker process: its request loop (main.py), the runtime that holds the model (runtime.py) and the memory
budget."""
