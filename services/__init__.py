"""dsv2-serve services: engine, expert shards, Ray Serve app, gateway, and the CLI."""
