"""Session-wide fixtures live in tests/support as plugins so that one Redis server, one Ray
cluster and one set of tiny checkpoints serve every test folder that needs them."""

pytest_plugins = [
    "tests.support.checkpoint_fixtures",
    "tests.support.cuda_fixtures",
    "tests.support.redis_fixtures",
    "tests.support.ray_fixtures",
]
