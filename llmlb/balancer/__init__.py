"""The balancer and its nodes (LB-1..LB-4).

- ``registry``: nodes in SQLite (registration, heartbeats, status, cooldown, pull assignments),
  each name bound to the secret of the node that first registered it
- ``registration``: a node's registration and heartbeat bodies, checked
- ``reports``: what a node or an endpoint reports, typed and checked where it enters
- ``urls``: what a member's URL may be, and the paths the balancer asks at it
- ``inflight``: requests in flight per node, counted by every worker in shared memory
- ``upstream``: the node seam: hand a request to a node, get (status, headers, body) back;
  the in-process node runs ``serving/``, a remote one is reached over pooled HTTP
- ``members``: the nodes a balancer can route to right now, local and remote
- ``routing``: ready or resolvable candidates, least busy, prefix-aware affinity
- ``prefixes``: where each recent prompt prefix was served, shared by every worker
- ``proxy``: forwarding with failover, cooldown and pass-through streaming
- ``agent``: the node's side: its report, registration and heartbeats, its credentials
- ``endpoints``: external OpenAI-compatible servers as registry members (LB-5): checked when
  added, then their models, health and load refreshed by the supervisor
- ``credentials``: an endpoint's API key as stored (an env var's name, or sealed with Fernet)
- ``accounting``: what each forwarded request leaves for metrics and history (LB-6): status,
  latency, time to first byte, tokens from the answer's usage
"""
