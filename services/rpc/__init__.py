"""Python modules generated from proto/dsv2/v1 (committed; regenerate with
`python -m services.rpc.generate`, a test checks that doing so changes nothing)."""
