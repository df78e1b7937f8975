"""The sandboxed executor: the worker process that alone opens model files and runs JAX, the policy it
applies to itself first (policy.py), the wire protocol to it (protocol.py) and the parent's client (client.py).
corejax.Session is the public face; corejax.sandbox.testing runs probes inside a worker for containment tests."""
