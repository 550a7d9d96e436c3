"""The cluster configs: Ray's own validation, safety rules, and Ray's AWS bootstrap against
moto's mocked AWS (offline)."""

import copy
import json
import re
import sys
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
CONFIGS = ["aws.yaml", "local.yaml"]


def _load(name):
    return yaml.safe_load((CLUSTER / name).read_text())


@pytest.mark.parametrize("name", CONFIGS)
def test_configs_pass_rays_validation_and_a_broken_copy_fails(name):
    validate_config(prepare_config(_load(name)))
    broken = _load(name)
    broken["max_workers"] = "eight"
    # the schema refuses it (local.yaml's provider compares it first, a TypeError)
    with pytest.raises((jsonschema.ValidationError, TypeError)):
        validate_config(prepare_config(broken))


def _pin(text, package):
    found = re.findall(rf"(?<![\w-]){re.escape(package)}==([\w.]+)", text)
    assert len(set(found)) == 1, (package, found)
    return found[0]


@pytest.mark.parametrize("name", ["aws.yaml", "local.yaml"])
def test_ray_up_copies_no_environment_output_or_cache(name):
    excluded = set(_load(name)["rsync_exclude"])
    assert {".git", ".venv", "venv/", "runs/", "**/__pycache__", ".pytest_cache", ".ruff_cache"} <= excluded


def test_image_matches_ray_and_python_and_setup_installs_the_project():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert re.findall(r"^FROM\s+(\S+)", dockerfile, re.M) == [f"rayproject/ray:{ray.__version__}-{py}-gpu"]
    import torch
    import torchvision

    assert _pin(dockerfile, "torch") == torch.__version__.split("+")[0]
    assert _pin(dockerfile, "torchvision") == torchvision.__version__.split("+")[0]

    # the package pins Ray to the image's series: an upgrade is a deliberate change of both
    import tomllib
    from packaging.requirements import Requirement
    from packaging.version import Version

    deps = tomllib.loads((CLUSTER.parent / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray_req,) = [Requirement(d) for d in deps if Requirement(d).name == "ray"]
    image_ray = Version(re.search(r"rayproject/ray:([\d.]+)-", dockerfile).group(1))
    assert image_ray in ray_req.specifier and Version(ray.__version__) in ray_req.specifier
    assert Version(f"{image_ray.major}.{image_ray.minor + 1}.0") not in ray_req.specifier
    assert Version(f"{image_ray.major}.{image_ray.minor}.99") in ray_req.specifier

    images = {name: _load(name)["docker"]["image"] for name in CONFIGS}
    assert len(set(images.values())) == 1, images
    image = images["aws.yaml"]
    assert not image.startswith("rayproject/")
    assert image.rsplit("/", 1)[-1] in dockerfile  # the build command names the configured tag
    registry = image.split("/")[0]
    assert any("docker login" in c and registry in c for c in _load("aws.yaml")["initialization_commands"])

    for name in CONFIGS:
        cfg = _load(name)
        assert cfg["docker"]["pull_before_run"] is True, name
        installs = [c for c in cfg["setup_commands"] if "pip install" in c]
        assert any("/home/ray/vitcae_ray" in c for c in installs), name
        for c in installs:  # the image holds the dependencies; nothing is reinstalled at boot
            assert "--no-deps" in c.split() and not re.search(r"\btorch", c), (name, c)
        assert cfg["file_mounts"]["/home/ray/vitcae_ray"] == "."
        head = " ".join(cfg["head_start_ray_commands"])
        assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head, name


def test_no_rule_opens_anything_to_the_internet_and_every_node_type_names_its_groups():
    for path in CLUSTER.glob("*.yaml"):
        assert "0.0.0.0/0" not in re.sub(r"\(\?!.*?\)", "", path.read_text()), path.name
    aws = _load("aws.yaml")
    assert aws["provider"]["cache_stopped_nodes"] is False
    for name, node in aws["available_node_types"].items():
        assert node["node_config"]["SecurityGroupIds"], name
        assert "IamInstanceProfile" in node["node_config"], name
    assert "trial_driver" in aws["available_node_types"]["head"]["resources"]
    # the prerequisites template: SSH only from the given CIDR, all else only within the group
    template = (CLUSTER / "aws-prerequisites.yaml").read_text()
    assert "CidrIp: !Ref AllowedSshCidr" in template and template.count("CidrIp") == 1


def _mock_account(region):
    import boto3

    ec2 = boto3.client("ec2", region_name=region)
    vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
    subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24", AvailabilityZone=f"{region}a")["Subnet"][
        "SubnetId"
    ]
    ec2.modify_subnet_attribute(SubnetId=subnet, MapPublicIpOnLaunch={"Value": True})
    sg = ec2.create_security_group(GroupName="vitcae-ray", Description="vitcae", VpcId=vpc)["GroupId"]
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    iam = boto3.client("iam", region_name=region)
    trust = {
        "Statement": [
            {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}
        ]
    }
    arns = {}
    for role in ("vitcae-ray-head", "vitcae-ray-worker"):
        iam.create_role(RoleName=role, AssumeRolePolicyDocument=json.dumps(trust))
        arns[role] = iam.create_instance_profile(InstanceProfileName=role)["InstanceProfile"]["Arn"]
        iam.add_role_to_instance_profile(InstanceProfileName=role, RoleName=role)
    return subnet, sg, ami, arns


def _filled(subnet, sg, ami, arns):
    cfg = _load("aws.yaml")
    for name, node in cfg["available_node_types"].items():
        nc = node["node_config"]
        nc.update(SubnetIds=[subnet], SecurityGroupIds=[sg], ImageId=ami)
        nc["IamInstanceProfile"] = {"Arn": arns["vitcae-ray-head" if name == "head" else "vitcae-ray-worker"]}
    return cfg


@pytest.fixture
def mocked_aws(monkeypatch, tmp_path):
    import moto

    monkeypatch.setenv("HOME", str(tmp_path))  # the bootstrap writes a key file under ~/.ssh
    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-west-2",
    }.items():
        monkeypatch.setenv(k, v)
    with moto.mock_aws():
        yield


def test_rays_aws_bootstrap_resolves_the_configs_resources(mocked_aws):
    from ray.autoscaler._private.aws.config import bootstrap_aws

    region = _load("aws.yaml")["provider"]["region"]
    subnet, sg, ami, arns = _mock_account(region)
    boot = bootstrap_aws(prepare_config(_filled(subnet, sg, ami, arns)))
    for name, node in boot["available_node_types"].items():
        assert node["node_config"]["SecurityGroupIds"] == [sg], name
        assert node["node_config"]["SubnetIds"] == [subnet], name
    assert (
        boot["available_node_types"]["head"]["node_config"]["IamInstanceProfile"]["Arn"]
        == arns["vitcae-ray-head"]
    )


def test_a_missing_security_group_fails_the_bootstrap(mocked_aws, capfd):
    from ray.autoscaler._private.aws.config import bootstrap_aws

    region = _load("aws.yaml")["provider"]["region"]
    subnet, _, ami, arns = _mock_account(region)
    cfg = _filled(subnet, "sg-0123456789abcdef0", ami, arns)
    with pytest.raises(AssertionError):  # Ray's cli_logger.doassert
        bootstrap_aws(prepare_config(copy.deepcopy(cfg)))
    out, err = capfd.readouterr()
    assert "Failed to detect a security group" in out + err
