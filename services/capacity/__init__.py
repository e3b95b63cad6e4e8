"""Capacity planning on paper: traffic assumptions and measured per-replica figures in,
Engine replicas, expert shards, GPUs, gateway replicas and Redis load out (`dsv2 capacity`)."""
