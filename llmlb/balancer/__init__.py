"""The balancer and its nodes (LB-1..LB-4). It knows its members through a protocol
(``members.Member``) and the node seam (``upstream``), and imports nothing of engines, the
resolver, serving or the node package: the role's builder hands it the in-process member.

- ``registry``: nodes and endpoints in the shared state (registration, heartbeats, status,
  cooldown, pull assignments; the SQL in ``state/members.py``),
  each name bound to the secret of the node that first registered it
- ``registration``: a node's registration and heartbeat bodies, checked
- ``reports``: what a node or an endpoint reports, typed and checked where it enters
- ``inflight``: requests in flight per node, counted by every worker in shared memory
- ``upstream``: the node seam: the operations forwarded and their paths, hand a request to a
  node, get (status, headers, body) back; a remote node is reached over pooled HTTP
- ``members``: the nodes a balancer can route to right now, as ``Member``s
- ``routing``: ready or resolvable candidates, least busy, prefix-aware affinity
- ``prefixes``: where each recent prompt prefix was served, shared by every worker
- ``placement``: which member pulls a model no one has ready, for requests and the hub alike
- ``proxy``: forwarding with failover, cooldown and pass-through streaming
- ``endpoints``: external OpenAI-compatible servers as registry members (LB-5): checked when
  added, then their models, health and load refreshed by the supervisor
- ``credentials``: an endpoint's API key as stored (an env var's name, or sealed with Fernet)
- ``translate``: the Responses and Messages APIs for an endpoint that lacks them, translated
  to chat completions and back by the dialect modules (``llmlb/dialects/``)
- ``providers``: hosted providers by prefix (``openai:``, ``anthropic:``, ``google:``, AG-4) as
  members, their keys only ever sent to their own base URLs
- ``stored_responses``: the Responses API's state (``previous_response_id``, ``store``)
- ``accounting``: what each forwarded request leaves for metrics and history (LB-6): status,
  latency, time to first byte, tokens from the answer's usage
"""
