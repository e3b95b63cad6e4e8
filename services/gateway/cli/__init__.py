"""The gateway's commands: `dsv2 gateway`, `dsv2 keys`, `dsv2 users`, `dsv2 usage`."""
