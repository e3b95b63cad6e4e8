"""The Ray Serve model plane: Engine and ExpertShard deployments behind Serve's gRPC ingress."""
