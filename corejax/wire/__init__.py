"""The parent <-> worker protocol: frames (protocol.py) and the typed messages they carry (messages.py)."""
