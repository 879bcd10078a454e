"""The node in this process as a member of its balancer (standalone, and a node's own
requests): always online, never in cooldown (its failures are its models', not the
network's); what it has comes from its own disk and hardware, not from a heartbeat."""

from __future__ import annotations

from collections.abc import Callable

from ..balancer.registry import NODE, ONLINE
from ..balancer.reports import ModelEntry, NodeReport
from ..balancer.upstream import ProxyRequest
from ..hardware import Memory
from ..resolver import Resolver
from .local import files_here
from .transport import InProcessNode

IN_PROCESS_SLOT = 0  # its in-flight counter (registered members count from 1)


def ready_models(resolver: Resolver) -> tuple[ModelEntry, ...]:
    """The models ready on this node's disks as it reports them: OpenAI model objects, no
    local paths."""
    return tuple(ModelEntry(id=m.id, created=m.created, owned_by=m.source, format=m.format,
                            size_bytes=m.size_bytes) for m in resolver.list_models())


class LocalMember:
    id = IN_PROCESS_SLOT
    kind = NODE
    url = None
    record = None
    status = ONLINE
    in_process = True

    def __init__(self, node: InProcessNode, resolver: Resolver, memory: Callable[[], Memory],
                 report: Callable[[], NodeReport]) -> None:
        self.node = node
        self.name = node.name
        self.resolver, self._memory, self._report = resolver, memory, report

    def ready(self, model_id: str, request: ProxyRequest | None = None) -> bool:
        if request is not None:  # the look its transport then uses
            return files_here(self.resolver, request) is not None
        return self.resolver.find(model_id) is not None

    def models(self) -> tuple[ModelEntry, ...]:
        return ready_models(self.resolver)

    def queued(self) -> int:
        return 0  # its waiting requests are already among the balancer's in flight

    def free_memory(self) -> int:
        return self._memory().free_bytes

    def pulling(self, model_id: str) -> bool:
        return self.resolver.download_state(model_id) == "running"

    def can_fetch(self, model_id: str, balancer_has_it: bool) -> bool:
        return True  # its resolver decides, with the errors standalone always gave

    def report(self) -> NodeReport:
        return self._report()
