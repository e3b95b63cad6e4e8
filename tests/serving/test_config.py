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
        ({"model_path": "/m", "dtype": "bfloat16"}, "dtype is an engine option: set engine.dtype"),
        ({"model_path": "/m", "engine": {"dtype": "float8"}}, "dtype='float8' is not supported"),
        ({"model_path": "/m", "engine": {"device": "tpu"}}, "device='tpu' is not a device"),
        (
            {"model_path": "/m", "engine": {"device": "cuda"}},
            "engine.device='cuda' needs engine_deployment.num_gpus > 0",
        ),
        (
            {"model_path": "/m", "engine": {"device": "cpu"}, "engine_deployment": {"num_gpus": 1}},
            "num_gpus=1 reserves a GPU but engine.device='cpu'",
        ),
        ({"model_path": "/m", "shard_port_base": 65535, "num_expert_shards": 4}, "65536"),
        ({"model_path": "/m", "engine": {"max_waiting_requests": -3}}, "max_waiting_requests must"),
        ({"model_path": "/m", "engine": {"max_waiting_tokens": -1}}, "max_waiting_tokens must"),
        (
            {"model_path": "/m", "engine": {"shed_priorities": ["bronze"]}},
            "shed_priorities: unknown priority 'bronze'",
        ),
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


def test_replicas_place_the_engine_and_shards_by_their_gpu_reservation():
    # auto becomes cuda in a replica that reserved a GPU (a missing GPU then fails loudly)
    # and cpu in one that reserved none; shards follow their own deployment's GPU
    gpu = ModelPlaneConfig.model_validate(
        {
            "model_path": "/m",
            "engine": {"dtype": "bfloat16", "max_num_seqs": 8},
            "engine_deployment": {"num_gpus": 1},
        }
    )
    assert gpu.replica_engine_options() == {
        "dtype": "bfloat16",
        "max_num_seqs": 8,
        "device": "cuda",
    }
    assert gpu.shard_placement() == ("cpu", "bfloat16")
    cpu = ModelPlaneConfig.model_validate({"model_path": "/m", "shard_deployment": {"num_gpus": 1}})
    assert cpu.replica_engine_options() == {"device": "cpu"}
    assert cpu.shard_placement() == ("cuda", "auto")
    pinned = ModelPlaneConfig.model_validate(
        {"model_path": "/m", "engine": {"device": "cuda:1"}, "engine_deployment": {"num_gpus": 2}}
    )
    assert pinned.replica_engine_options()["device"] == "cuda:1"


def test_engine_autoscaling_and_routing_become_serve_options():
    from services.serving.app import engine_options

    fixed = engine_options(ModelPlaneConfig.model_validate({"model_path": "/m"}))
    assert fixed["num_replicas"] == 1 and "autoscaling_config" not in fixed
    router = fixed["request_router_config"]  # prefix-aware routing is the default
    assert router["request_router_class"] == "services.serving.router:PrefixAffinityRouter"
    assert router["request_router_kwargs"]["max_imbalance"] == 4
    scaled = engine_options(
        ModelPlaneConfig.model_validate(
            {
                "model_path": "/m",
                "engine_autoscaling": {"min_replicas": 2, "max_replicas": 6},
                "routing": {"policy": "default"},
            }
        )
    )
    assert "num_replicas" not in scaled and "request_router_config" not in scaled
    assert scaled["autoscaling_config"] == {
        "min_replicas": 2,
        "max_replicas": 6,
        "target_ongoing_requests": 16.0,
        "upscale_delay_s": 30.0,
        "downscale_delay_s": 600.0,
    }


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (
            {"engine_replicas": 2, "engine_autoscaling": {}},
            "engine_replicas and engine_autoscaling both set",
        ),
        ({"engine_autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "max_replicas=2 is below"),
        ({"engine_autoscaling": {"target_ongoing_requests": 0}}, "target_ongoing_requests"),
        ({"routing": {"policy": "random"}}, "policy"),
        ({"routing": {"max_imbalance": -1}}, "max_imbalance"),
    ],
)
def test_bad_routing_or_autoscaling_is_refused_naming_the_field(args, complaint):
    with pytest.raises(ValidationError, match=complaint):
        build_app({"model_path": "/m", **args})
