"""What a node is: the models of this process and the way requests reach them.

- ``pool``: loaded models (EN-4): reuse, idle unload, a cap, slots and a bounded queue
- ``local``: a request's model found once, leased, and one inference call run on it; the
  one place engines are called and their exceptions become API errors
- ``transport``: the in-process node behind the balancer's node seam (``send``): serving's
  functions, one per operation, on this process's models
- ``member``: that node as a member of its balancer (standalone, and a node's own requests)
- ``agent``: a node's side of the cluster: its report, registration and heartbeats, and who
  may call it

The balancer never imports this package: a role's builder (``llmlb/roles.py``) hands it the
in-process member.
"""
