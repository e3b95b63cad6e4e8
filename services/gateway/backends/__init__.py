"""What the gateway talks to: Redis (pool, Lua scripts, pipelined mux) and the model plane."""
