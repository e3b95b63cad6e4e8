"""build_app's config: one dict for `serve run`, serveConfigV2 and the CLI, checked up front."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from services.serving.app import build_app
from services.serving.config import ModelPlaneConfig


def test_defaults_and_resources():
    config = ModelPlaneConfig.model_validate({"model_path": "/models/DeepSeek-V2-Lite-Chat/"})
    assert config.served_model_id == "DeepSeek-V2-Lite-Chat"
    assert (config.num_expert_shards, config.engine_replicas, config.shard_port_base) == (2, 1, 0)
    # every deployment declares CPUs and a generous max_ongoing_requests (not Serve's 5)
    assert config.engine_deployment.actor_options() == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert config.engine_deployment.max_ongoing_requests >= 64
    assert config.shard_deployment.max_ongoing_requests >= 16
    gpu = ModelPlaneConfig.model_validate(
        {
            "model_path": "/m",
            "shard_deployment": {"num_cpus": 2, "num_gpus": 1, "resources": {"expert": 1}},
        }
    )
    assert gpu.shard_deployment.actor_options() == {
        "num_cpus": 2,
        "num_gpus": 1,
        "resources": {"expert": 1},
    }
    assert gpu.shard_deployment.threads() == 2


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        ({"model_path": "/m", "num_expert_shards": -1}, "num_expert_shards"),
        ({"model_path": "/m", "engine": {"max_batch": 3}}, "unknown engine options ['max_batch']"),
        ({"model_path": "/m", "dtype": "float8"}, "dtype"),
        ({"model_path": "/m", "shard_port_base": 65535, "num_expert_shards": 4}, "65536"),
        ({"num_expert_shards": 2}, "model_path"),
        ({"model_path": "/m", "engine_deployment": {"cpus": 1}}, "cpus"),
    ],
)
def test_bad_config_fails_before_anything_is_deployed(args, complaint):
    with pytest.raises(ValidationError, match=complaint.replace("[", r"\[").replace("]", r"\]")):
        build_app(args)


def test_serve_run_string_args_are_accepted():
    # `serve run services.serving.app:build_app num_expert_shards=4 ...` passes strings
    app = build_app({"model_path": "/m", "num_expert_shards": "4", "engine_replicas": "2"})
    assert app is not None
