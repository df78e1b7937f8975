"""The OS policy a sandboxed worker applies to itself before it reads a byte of the model: no_new_privs, seccomp
(seccomp.py), Landlock, a network namespace and rlimits (policy.py), and the report of which layers engaged
(layer.py), which the parent checks against what it requires."""
