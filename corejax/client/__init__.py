"""The parent process: Sessions, the worker each talks to (a sandboxed subprocess, a thread, or a kept server's),
progress and compiled-program folders. Never imports JAX."""
