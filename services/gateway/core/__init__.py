"""What a chat service decides, whatever the transport: chat turns, identity, quotas, sessions,
keys, tiers, input validation, drain, and the errors clients see."""
