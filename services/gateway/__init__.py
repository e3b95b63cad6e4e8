"""The gateway: identity, quotas, sessions and the public APIs (HTTP + gRPC) in front of the
model plane. Stateless: every piece of state lives in Redis, so replicas scale out freely.

Never imports `model`, torch or `services.engine`: the model plane is reached through the
`ModelBackend` protocol (services.gateway.backends.model_plane).
"""
