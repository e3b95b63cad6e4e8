"""One-machine launcher: `dsv2 serve` (Redis + Ray model plane + gateway) and `dsv2 chat`."""
