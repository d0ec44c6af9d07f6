"""The files in cluster/ are valid for the tools that read them."""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

from app.serve.build import BuildArgs, build_app

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


def test_serve_config_is_a_valid_serve_deploy_config() -> None:
    spec = ServeDeploySchema.model_validate(yaml.safe_load((CLUSTER / "serve.yaml").read_text()))
    app = spec.applications[0]
    assert app.import_path == "app.serve.build:build_app"
    BuildArgs.model_validate(app.args)  # the builder accepts the args
    assert build_app(app.args) is not None


def test_rayservice_embeds_a_valid_serve_config() -> None:
    doc = yaml.safe_load((CLUSTER / "rayservice.yaml").read_text())
    assert doc["kind"] == "RayService"
    serve_cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_cfg)
    groups = {g["groupName"]: g for g in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1" and groups["gpu"]["minReplicas"] == 0
