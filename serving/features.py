"""Online feature enrichment: the model's FeatureService from Feast's online store, batched and cached.

Each entity's features are cached for ``max_staleness_s`` (bounded staleness: a served value is at most
that much older than the online store's). Misses in a batch cost one online-store read per feature view.
A missing entity (never materialized, or older than the view's TTL) has one documented behaviour: its
features are unknown (NaN), the row is still scored, and the response marks it ``entity_found: false``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from feast import FeatureService, FeatureStore


@dataclass(frozen=True)
class View:
    name: str
    key: str  # join key, e.g. customer_id
    features: tuple[str, ...]


def views_of(store: FeatureStore, service: FeatureService) -> list[View]:
    """The service's feature views, with their join keys and the features the service takes."""
    views = []
    for projection in service.feature_view_projections:
        fv = store.get_feature_view(projection.name)
        (key,) = fv.join_keys
        views.append(View(projection.name_to_use(), key, tuple(f.name for f in projection.features)))
    return views


class OnlineFeatures:
    """``lookup(rows)`` fills the service's features for entity keys; thread-safe."""

    def __init__(self, store: FeatureStore, views: list[View], max_staleness_s: float = 5.0,
                 max_entries: int = 200_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._store = store
        self._views = views
        self._ttl = max_staleness_s
        self._max = max_entries
        self._clock = clock
        self._cache: dict[str, OrderedDict] = {v.name: OrderedDict() for v in self._views}
        self._lock = threading.Lock()

    @classmethod
    def for_service(cls, store: FeatureStore, service: FeatureService, max_staleness_s: float = 5.0) -> OnlineFeatures:
        return cls(store, views_of(store, service), max_staleness_s)

    def lookup(self, entities: list[dict[str, int]]) -> tuple[dict[str, list], list[bool]]:
        """Features per row (None when unknown) and whether every view found the row's entity."""
        values: dict[str, list] = {}
        found = [True] * len(entities)
        now = self._clock()
        for view in self._views:
            cache = self._cache[view.name]
            ids = [row[view.key] for row in entities]
            with self._lock:
                hits = {i: cache.get(i) for i in set(ids)}
            misses = [i for i, hit in hits.items() if hit is None or hit[0] < now]
            if misses:
                fetched = self._read(view, misses)
                with self._lock:
                    for i in misses:
                        hits[i] = (now + self._ttl, fetched[i])
                        cache[i] = hits[i]
                        cache.move_to_end(i)
                    while len(cache) > self._max:
                        cache.popitem(last=False)
            for j, name in enumerate(view.features):
                values[name] = [hits[i][1][j] if hits[i][1] is not None else None for i in ids]
            for r, i in enumerate(ids):
                if hits[i][1] is None:
                    found[r] = False
        return values, found

    def _read(self, view: View, ids: list[int]) -> dict[int, tuple | None]:
        refs = [f"{view.name}:{f}" for f in view.features]
        result = self._store.get_online_features(features=refs, entity_rows=[{view.key: i} for i in ids]).to_dict()
        out: dict[int, tuple | None] = {}
        for r, i in enumerate(ids):
            row = tuple(result[f][r] for f in view.features)
            out[i] = None if all(v is None for v in row) else row
        return out
