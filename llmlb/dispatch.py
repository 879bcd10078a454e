"""The balancer's one way to a model: choose a node for each call and hand it over.

Every ``/v1`` route goes through ``Dispatcher``; today the only node is the in-process one,
and remote nodes join by being added to ``nodes`` and to ``choose_node``, not to the routes.
"""

from __future__ import annotations

from typing import Protocol

from .node import Generation, InferenceCall
from .storage import LocalModel


class Node(Protocol):
    name: str

    def models(self) -> list[LocalModel]: ...

    def find(self, model_id: str) -> LocalModel | None: ...

    def run(self, call: InferenceCall) -> Generation | tuple[list[list[float]], int]: ...


class Dispatcher:
    def __init__(self, nodes: list[Node]) -> None:
        if not nodes:
            raise ValueError("a dispatcher needs at least one node")
        self.nodes = nodes

    def list_models(self) -> list[tuple[LocalModel, list[str]]]:
        """Each servable model once, with the nodes that have it ready."""
        by_id: dict[str, tuple[LocalModel, list[str]]] = {}
        for node in self.nodes:
            for model in node.models():
                by_id.setdefault(model.id, (model, []))[1].append(node.name)
        return [by_id[k] for k in sorted(by_id)]

    def locate(self, model_id: str) -> tuple[LocalModel, list[str]] | None:
        """The model and the nodes that have it ready, or None."""
        found = [(node.name, node.find(model_id)) for node in self.nodes]
        names = [name for name, model in found if model is not None]
        if not names:
            return None
        return next(model for _, model in found if model is not None), names

    def choose_node(self, call: InferenceCall) -> Node:
        """A node that has the model ready, else the first that can resolve it."""
        for node in self.nodes:
            if node.find(call.model_id) is not None:
                return node
        return self.nodes[0]

    def dispatch(self, call: InferenceCall) -> Generation | tuple[list[list[float]], int]:
        return self.choose_node(call).run(call)
