"""The gRPC side: `dsv2.v1.Chat` for internal clients, with health and reflection."""
