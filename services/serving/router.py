"""Prefix-cache-aware routing of Engine requests: a Ray Serve custom request router.

Serve builds one router per deployment handle, so for requests from the gRPC ingress it lives
in each Serve proxy. There a request reaches `choose_replicas` as `args[0]` = the pickled
`gRPCRequest` whose `user_request_proto` is the serialized `dsv2.v1.GenerateRequest`; the
router reads the prompt and `session_id` from it (and Serve's own `session_id` gRPC metadata
when the field is empty). The policy is in services/serving/affinity.py.

Loads: the requests this router has in flight per replica, or Serve's cached queue length of
the replica when that is higher (it also counts other proxies' requests).

Configured by `ModelPlaneConfig.routing`; `build_app` passes its fields as
`request_router_kwargs`, which Serve hands to `initialize_state`.
"""

from __future__ import annotations

import logging
import pickle
from collections import Counter
from typing import Any

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from services.rpc.dsv2.v1 import inference_pb2 as pb
from services.serving.affinity import (
    TEXT_CHUNK_CHARS,
    TOKEN_CHUNK_IDS,
    Candidate,
    PrefixIndex,
    choose,
    home_replica,
    prefix_keys,
)

log = logging.getLogger(__name__)

ROUTED_METHOD = "Generate"  # the other RPCs carry no prompt: least loaded


def generate_request_of(pending: PendingRequest | None) -> pb.GenerateRequest | None:
    """The GenerateRequest a pending Serve request carries, or None (another RPC, a handle
    call with other arguments, anything unreadable: those are routed by load alone)."""
    if pending is None or not pending.args or pending.metadata.call_method != ROUTED_METHOD:
        return None
    arg = pending.args[0]
    try:
        if isinstance(arg, bytes):  # Serve's gRPC proxy pickles gRPCRequest itself: trusted
            arg = pickle.loads(arg)
        arg = getattr(arg, "user_request_proto", arg)
        if isinstance(arg, pb.GenerateRequest):
            return arg
        if isinstance(arg, bytes):
            return pb.GenerateRequest.FromString(arg)
    except Exception as exc:  # a request the replica will refuse anyway; route it by load
        log.debug("routing by load: unreadable request (%s)", exc)
    return None


class PrefixAffinityRouter(RequestRouter):
    """Sends a request to the replica holding the longest cached prefix of its prompt (or its
    session's previous turn) while that replica's load is within `max_imbalance` requests of
    the least loaded one; else to the least loaded."""

    def initialize_state(
        self,
        max_imbalance: int = 4,
        max_keys_per_replica: int = 100_000,
        max_sessions: int = 100_000,
        text_chunk_chars: int = TEXT_CHUNK_CHARS,
        token_chunk_ids: int = TOKEN_CHUNK_IDS,
        **_: Any,
    ) -> None:
        self.max_imbalance = max_imbalance
        self.text_chunk_chars = text_chunk_chars
        self.token_chunk_ids = token_chunk_ids
        self.index = PrefixIndex(max_keys_per_replica, max_sessions)
        self.in_flight: Counter[ReplicaID] = Counter()
        self._inflight_ids: dict[str, ReplicaID] = {}
        self.decisions: Counter[str] = Counter()  # reason -> count, for logs and tests

    def _keys(self, request: pb.GenerateRequest):
        return prefix_keys(request, self.text_chunk_chars, self.token_chunk_ids)

    @staticmethod
    def _session_of(pending: PendingRequest, request: pb.GenerateRequest | None) -> str:
        return (request.session_id if request is not None else "") or pending.metadata.session_id

    def _load(self, replica: RunningReplica) -> int:
        cached = self.replica_queue_len_cache.get(replica.replica_id)
        return max(self.in_flight[replica.replica_id], cached or 0)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # When no replica takes it, wait (Serve's backoff) before asking again.
            pending_request.routing_context.should_backoff = True
        request = generate_request_of(pending_request)
        keys = self._keys(request) if request is not None else []
        session = self._session_of(pending_request, request) if pending_request else ""
        last = self.index.session_replica(session)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        candidates = [
            Candidate(
                replica=rid,
                load=self._load(r),
                capacity=r.max_ongoing_requests,
                matched=self.index.matched(rid, keys),
                session=rid == last,
            )
            for rid, r in by_id.items()
        ]
        choice = choose(candidates, self.max_imbalance, home_replica(session, by_id))
        self.decisions[choice.reason] += 1
        return [[by_id[rid] for rid in rank] for rank in choice.ranks]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any
    ) -> None:
        self.in_flight[replica_id] += 1
        self._inflight_ids[pending_request.metadata.internal_request_id] = replica_id
        request = generate_request_of(pending_request)
        if request is not None:
            self.index.record(
                replica_id.unique_id,
                self._keys(request),
                self._session_of(pending_request, request),
            )

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        if self._inflight_ids.pop(internal_request_id, None) is not None:
            self.in_flight[replica_id] = max(0, self.in_flight[replica_id] - 1)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id for r in replicas}
        self.index.forget(r.unique_id for r in live)
        for gone in [r for r in self.in_flight if r not in live]:
            del self.in_flight[gone]
