"""Model resolution (RS-2): local directory, then the shared path (in place), then a download
from an allowed source, else ``model_not_found``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from .. import errors
from ..catalog import Catalog
from ..config import Settings
from ..storage import LocalModel, find_model, merged_listing

log = logging.getLogger(__name__)


class Resolver:
    def __init__(self, settings: Settings, catalog: Catalog,
                 formats: Callable[[], Mapping[str, tuple[str, ...]]]) -> None:
        self.settings = settings
        self.catalog = catalog
        self._formats = formats

    def roots(self) -> list[tuple]:
        return [(self.settings.models_dir, "local"), (self.settings.shared_models_dir, "shared")]

    def list_models(self) -> list[LocalModel]:
        return merged_listing(self.roots(), self._formats())

    def find(self, model_id: str) -> LocalModel | None:
        """The model's files if they are here already: local first, then shared (in place)."""
        for root, source in self.roots():
            model = find_model(root, model_id, source, self._formats())
            if model is not None:
                return model
        return None

    def resolve(self, model_id: str) -> LocalModel:
        model = self.find(model_id)
        if model is not None:
            return model
        raise errors.model_not_found(model_id)
