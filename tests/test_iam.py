"""The instance profiles of cluster/aws-prerequisites.yaml, statement by statement.

Each rule is a checker function that returns the problems it finds in a :class:`Policy`; the
tests run every checker on the template, and on deliberately broken copies of it, which each
checker must reject. Only the standard library and PyYAML: no AWS calls."""

import copy
import dataclasses
import fnmatch
import re
from pathlib import Path

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
CLUSTER_TAG = "ray-cluster-name"
CLUSTER_NAME = {"Ref": "ClusterName"}  # the parameter every cluster-name condition compares with
PSEUDO_PARAMETERS = {"AWS::AccountId", "AWS::Partition", "AWS::Region", "AWS::StackName", "AWS::URLSuffix"}
# RunInstances authorizes each of these on every launch (with a key pair and spot, two more)
RUN_INSTANCES_TYPES = {"instance", "network-interface", "security-group", "subnet", "volume", "image"}
LIFECYCLE = ("ec2:TerminateInstances", "ec2:StopInstances", "ec2:StartInstances")
# the only calls allowed on Resource "*": read-only EC2 Describe calls, and ECR's login
ANY_RESOURCE_ALLOWED = re.compile(r"ec2:Describe[A-Za-z]+|ecr:GetAuthorizationToken")
CONDITION_OPERATOR = re.compile(
    r"(ForAllValues:|ForAnyValue:)?"
    r"(String(Not)?Equals(IgnoreCase)?|String(Not)?Like|Arn(Not)?(Equals|Like)"
    r"|Numeric(Not)?Equals|Numeric(Less|Greater)Than(Equals)?|Date(Not)?Equals|Date(Less|Greater)Than(Equals)?"
    r"|Bool|BinaryEquals|(Not)?IpAddress)(IfExists)?|Null"
)
ARN = re.compile(
    r"arn:\$\{AWS::Partition\}:(?P<service>[a-z0-9-]+):(?P<region>\$\{AWS::Region\}|[^:$]*)"
    r":(?P<account>\$\{AWS::AccountId\}|[^:$]*):(?P<rest>.+)"
)


# --- the template ----------------------------------------------------------------------------


class _CloudFormationLoader(yaml.SafeLoader):
    """YAML with CloudFormation's short-form tags (``!Ref X``, ``!Sub s``, ``!GetAtt A.B``, ...)
    read as their long forms (``{"Ref": "X"}``, ``{"Fn::Sub": "s"}``, ``{"Fn::GetAtt": ["A", "B"]}``)."""


def _intrinsic(loader, suffix, node):
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)
    if suffix == "Ref":
        return {"Ref": value}
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{suffix}": value}


_CloudFormationLoader.add_multi_constructor("!", _intrinsic)


def load_template() -> dict:
    return yaml.load((CLUSTER / "aws-prerequisites.yaml").read_text(), Loader=_CloudFormationLoader)


def load_aws() -> dict:
    return yaml.safe_load((CLUSTER / "aws.yaml").read_text())


def statements(role: dict) -> list[dict]:
    """The role's inline policy statements, with Action, NotAction, Resource and NotResource as lists."""
    out = []
    for policy in role["Properties"].get("Policies", []):
        for stmt in policy["PolicyDocument"]["Statement"]:
            stmt = dict(stmt)
            for key in ("Action", "NotAction", "Resource", "NotResource"):
                if key in stmt and not isinstance(stmt[key], list):
                    stmt[key] = [stmt[key]]
            out.append(stmt)
    return out


@dataclasses.dataclass
class Policy:
    head: list[dict]  # the head role's statements
    worker: dict  # the worker role resource
    params: dict  # the template's Parameters
    instance_types: set[str]  # the InstanceType of every node type in cluster/aws.yaml

    @classmethod
    def load(cls) -> "Policy":
        template, aws = load_template(), load_aws()
        resources = template["Resources"]
        types = {node["node_config"]["InstanceType"] for node in aws["available_node_types"].values()}
        return cls(statements(resources["HeadRole"]), resources["WorkerRole"], template["Parameters"], types)


@pytest.fixture
def policy() -> Policy:
    return Policy.load()


# --- helpers ---------------------------------------------------------------------------------


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def name(stmt: dict) -> str:
    return stmt.get("Sid") or repr(stmt.get("Action"))


def allows(stmt: dict, action: str) -> bool:
    """Whether the statement allows ``action``, through wildcards and NotAction too."""
    if stmt.get("Effect") != "Allow":
        return False
    if "NotAction" in stmt:
        return not any(fnmatch.fnmatchcase(action.lower(), p.lower()) for p in stmt["NotAction"])
    return any(fnmatch.fnmatchcase(action.lower(), p.lower()) for p in stmt.get("Action", []))


def condition(stmt: dict, operator: str, key: str):
    """The statement's value for ``key`` under ``operator`` (a one-element list as its element)."""
    value = stmt.get("Condition", {}).get(operator, {}).get(key)
    return value[0] if isinstance(value, list) and len(value) == 1 else value


def arn_text(resource) -> str | None:
    """The resource as written: the string, or the template string of a Fn::Sub; None otherwise."""
    if isinstance(resource, str):
        return resource
    if isinstance(resource, dict) and "Fn::Sub" in resource:
        sub = resource["Fn::Sub"]
        return sub[0] if isinstance(sub, list) else sub
    return None


# the subnet ARNs of the SubnetIds parameter, one per ID (Fn::Join takes no function in its
# delimiter, so they name no region and account)
SUBNET_PREFIX = "arn:aws:ec2:*:*:subnet/"
SUBNET_ARNS = {
    "Fn::Split": [
        ",",
        {"Fn::Join": ["", [SUBNET_PREFIX, {"Fn::Join": ["," + SUBNET_PREFIX, {"Ref": "SubnetIds"}]}]]},
    ]
}


def resource_type(resource) -> str | None:
    """``instance`` for ``arn:${AWS::Partition}:ec2:...:instance/*``, ``*`` for "*", ``subnet``
    for the SubnetIds ARNs, else None."""
    if resource == SUBNET_ARNS:
        return "subnet"
    text = arn_text(resource)
    if text == "*":
        return "*"
    match = ARN.fullmatch(text or "")
    if not match or match["service"] != "ec2":
        return None
    kind = re.fullmatch(r"([a-z-]+)/.+", match["rest"])
    return kind[1] if kind else None


def own_security_group(resource) -> bool:
    """Whether the resource is the template's own security group ARN."""
    text = arn_text(resource) or ""
    return re.search(r":security-group/\$\{ClusterSecurityGroup(\.GroupId)?\}$", text) is not None


def param_list(params: dict, name: str) -> list[str]:
    return [v.strip() for v in str(params[name].get("Default", "")).split(",") if v.strip()]


# --- the checkers: each returns the problems it finds ----------------------------------------


def create_tags_problems(p: Policy) -> list[str]:
    """ec2:CreateTags only at launch (ec2:CreateAction=RunInstances), or on instances tagged with
    the cluster's name, with a request that does not include that tag key."""
    problems = []
    for stmt in p.head:
        if not allows(stmt, "ec2:CreateTags"):
            continue
        at_launch = condition(stmt, "StringEquals", "ec2:CreateAction") == "RunInstances"
        tag_keys = stmt.get("Condition", {}).get("ForAllValues:StringNotEquals", {}).get("aws:TagKeys", [])
        retag = condition(
            stmt, "StringEquals", f"aws:ResourceTag/{CLUSTER_TAG}"
        ) == CLUSTER_NAME and CLUSTER_TAG in _as_list(tag_keys)
        if not (at_launch or retag):
            problems.append(f"{name(stmt)}: ec2:CreateTags neither at launch nor on the cluster's instances")
    return problems


def lifecycle_problems(p: Policy) -> list[str]:
    """Terminate, stop and start only instances tagged with the cluster's name."""
    return [
        f"{name(stmt)}: {action} without the {CLUSTER_TAG} resource-tag condition"
        for stmt in p.head
        for action in LIFECYCLE
        if allows(stmt, action)
        and condition(stmt, "StringEquals", f"aws:ResourceTag/{CLUSTER_TAG}") != CLUSTER_NAME
    ]


def run_instances_problems(p: Policy) -> list[str]:
    """RunInstances: one resource type per statement; instances only of aws.yaml's types and
    tagged with the cluster's name; only the SubnetIds subnets; only the own security group."""
    problems, covered = [], set()
    for stmt in p.head:
        if not allows(stmt, "ec2:RunInstances"):
            continue
        kinds = {resource_type(r) for r in stmt.get("Resource", [None])}
        if len(kinds) != 1 or kinds & {None, "*"}:
            problems.append(f"{name(stmt)}: RunInstances needs one named resource type, got {kinds}")
        covered |= kinds
        instance_type = condition(stmt, "StringEquals", "ec2:InstanceType")
        if "instance" in kinds:
            if instance_type != {"Ref": "InstanceTypes"}:
                problems.append(f"{name(stmt)}: instances not limited to the InstanceTypes parameter")
            if condition(stmt, "StringEquals", f"aws:RequestTag/{CLUSTER_TAG}") != CLUSTER_NAME:
                problems.append(f"{name(stmt)}: instances launched without the {CLUSTER_TAG} tag")
        elif instance_type is not None:  # absent on other resource types: it would deny every launch
            problems.append(f"{name(stmt)}: ec2:InstanceType on {kinds}")
        if "subnet" in kinds and stmt["Resource"] != [SUBNET_ARNS]:
            problems.append(f"{name(stmt)}: subnets not limited to the SubnetIds parameter")
        if "security-group" in kinds and not all(own_security_group(r) for r in stmt["Resource"]):
            problems.append(f"{name(stmt)}: a security group other than the template's own")
    if missing := RUN_INSTANCES_TYPES - covered:
        problems.append(f"RunInstances is not allowed on {sorted(missing)}: no launch would succeed")
    if set(param_list(p.params, "InstanceTypes")) != p.instance_types:
        problems.append(
            f"InstanceTypes {param_list(p.params, 'InstanceTypes')} != aws.yaml's {p.instance_types}"
        )
    if p.params.get("SubnetIds", {}).get("Type") != "List<AWS::EC2::Subnet::Id>":
        problems.append("SubnetIds is not a List<AWS::EC2::Subnet::Id> parameter")
    return problems


def pass_role_problems(p: Policy) -> list[str]:
    """iam:PassRole only for the worker role, and only to EC2."""
    problems = []
    for stmt in p.head:
        if not allows(stmt, "iam:PassRole"):
            continue
        if stmt.get("Resource") != [{"Fn::GetAtt": ["WorkerRole", "Arn"]}]:
            problems.append(f"{name(stmt)}: iam:PassRole on {stmt.get('Resource')}")
        if condition(stmt, "StringEquals", "iam:PassedToService") != "ec2.amazonaws.com":
            problems.append(f"{name(stmt)}: iam:PassRole not limited to ec2.amazonaws.com")
    return problems


def wildcard_problems(p: Policy) -> list[str]:
    """No Action "*" or "service:*", and no NotAction or NotResource."""
    problems = []
    for stmt in p.head + statements(p.worker):
        if "NotAction" in stmt or "NotResource" in stmt:
            problems.append(f"{name(stmt)}: NotAction/NotResource")
        problems += [
            f"{name(stmt)}: Action {a}" for a in stmt.get("Action", []) if a == "*" or a.endswith(":*")
        ]
    return problems


def any_resource_problems(p: Policy) -> list[str]:
    """Resource "*" only for read-only Describe calls and ECR's login."""
    return [
        f"{name(stmt)}: {action} on any resource"
        for stmt in p.head + statements(p.worker)
        if stmt.get("Effect") == "Allow" and "*" in stmt.get("Resource", ["*"])
        for action in stmt.get("Action", ["*"])
        if not ANY_RESOURCE_ALLOWED.fullmatch(action)
    ]


BUCKET = "arn:${AWS::Partition}:s3:::${BucketName}"
REPOSITORY = "arn:${AWS::Partition}:ecr:${AWS::Region}:${AWS::AccountId}:repository/${ImageRepository}"
WORKER_ALLOWED = {  # action -> the resources it may name
    "s3:ListBucket": {BUCKET},
    "s3:GetObject": {BUCKET + "/*"},
    "s3:PutObject": {BUCKET + "/*"},
    "s3:DeleteObject": {BUCKET + "/*"},
    "ecr:GetAuthorizationToken": {"*"},
    "ecr:BatchCheckLayerAvailability": {REPOSITORY},
    "ecr:GetDownloadUrlForLayer": {REPOSITORY},
    "ecr:BatchGetImage": {REPOSITORY},
}


def worker_problems(p: Policy) -> list[str]:
    """The worker: the experiment bucket and pulling the image from its repository, nothing else."""
    problems = [f"managed policy {arn}" for arn in p.worker["Properties"].get("ManagedPolicyArns", [])]
    for stmt in statements(p.worker):
        if stmt.get("Effect") != "Allow" or "NotAction" in stmt or "NotResource" in stmt:
            problems.append(f"{name(stmt)}: not a plain Allow")
            continue
        for action in stmt.get("Action", []):
            allowed = WORKER_ALLOWED.get(action, set())
            problems += [
                f"{name(stmt)}: {action} on {r}"
                for r in stmt.get("Resource", ["*"])
                if arn_text(r) not in allowed
            ]
    return problems


def grammar_problems(p: Policy) -> list[str]:
    """The AWS policy grammar: known statement keys, action and condition syntax, unique Sids,
    and ARNs written with Fn::Sub and the pseudo parameters."""
    problems = []
    for role, stmts in (("head", p.head), ("worker", statements(p.worker))):
        sids = [s["Sid"] for s in stmts if "Sid" in s]
        if len(sids) != len(set(sids)):
            problems.append(f"{role}: duplicate Sids {sids}")
        for stmt in stmts:
            if set(stmt) - {"Sid", "Effect", "Action", "NotAction", "Resource", "NotResource", "Condition"}:
                problems.append(f"{name(stmt)}: unknown keys {sorted(stmt)}")
            if stmt.get("Effect") not in ("Allow", "Deny") or not re.fullmatch(
                r"[A-Za-z0-9]*", stmt.get("Sid", "")
            ):
                problems.append(f"{name(stmt)}: Effect or Sid")
            for action in stmt.get("Action", []) + stmt.get("NotAction", []):
                if not re.fullmatch(r"[a-z0-9-]+:[A-Za-z0-9*]+|\*", action):
                    problems.append(f"{name(stmt)}: action {action!r}")
            for operator, keys in stmt.get("Condition", {}).items():
                if not CONDITION_OPERATOR.fullmatch(operator):
                    problems.append(f"{name(stmt)}: condition operator {operator}")
                problems += [
                    f"{name(stmt)}: condition key {k}"
                    for k in keys
                    if not re.fullmatch(r"(aws|ec2|iam|s3|ecr):[A-Za-z0-9_.-]+(/[A-Za-z0-9_.:-]+)?", k)
                ]
            for resource in stmt.get("Resource", []) + stmt.get("NotResource", []):
                text = arn_text(resource)
                if isinstance(resource, str) and "${" in resource:
                    problems.append(f"{name(stmt)}: {resource} has ${{}} outside Fn::Sub")
                if text is None or text == "*":
                    continue
                match = ARN.fullmatch(text)
                if not match:
                    problems.append(f"{name(stmt)}: {text} is not arn:${{AWS::Partition}}:...")
                    continue
                global_resource = match["service"] == "s3" or match["rest"].startswith("image/")
                region = "" if match["service"] == "s3" else "${AWS::Region}"
                account = "" if global_resource else "${AWS::AccountId}"
                if (match["region"], match["account"]) != (region, account):
                    problems.append(f"{name(stmt)}: {text} region or account")
    return problems


# --- the template as written -----------------------------------------------------------------


def _references(node, found):
    """Collect the names of every Ref, Fn::GetAtt and Fn::Sub ${...} under ``node``."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "Ref":
                found.add(value)
            elif key == "Fn::GetAtt":
                found.add(value[0])
            elif key == "Fn::Sub":
                text, local = (value[0], value[1]) if isinstance(value, list) else (value, {})
                found |= {
                    v.split(".")[0] if "::" not in v else v for v in re.findall(r"\$\{([^}!]+)\}", text)
                }
                found -= set(local)
                _references(local, found)
                continue
            _references(value, found)
    elif isinstance(node, list):
        for item in node:
            _references(item, found)
    return found


def test_every_reference_names_a_parameter_resource_or_pseudo_parameter():
    template = load_template()
    known = set(template["Parameters"]) | set(template["Resources"]) | PSEUDO_PARAMETERS
    assert _references(template["Resources"], set()) - known == set()
    assert _references(template["Outputs"], set()) - known == set()


def test_parameters_match_aws_yaml():
    params, aws = load_template()["Parameters"], load_aws()
    assert params["ClusterName"]["Default"] == aws["cluster_name"]
    repository = aws["docker"]["image"].split("/", 1)[1].split(":")[0]
    assert params["ImageRepository"]["Default"] == repository
    assert params["SubnetIds"]["Type"] == "List<AWS::EC2::Subnet::Id>"


# every rule of the policy: what it enforces -> the checker that finds its problems
RULES = {
    "grammar": grammar_problems,
    "create_tags_only_at_launch_or_on_the_clusters_instances_without_the_name_tag": create_tags_problems,
    "stop_start_terminate_only_the_clusters_instances": lifecycle_problems,
    "run_instances_only_the_configured_types_subnets_and_own_security_group": run_instances_problems,
    "pass_role_only_the_worker_role_to_ec2": pass_role_problems,
    "no_wildcard_actions": wildcard_problems,
    "any_resource_only_for_read_only_calls": any_resource_problems,
    "worker_only_the_bucket_and_the_image": worker_problems,
}


@pytest.mark.parametrize("rule", RULES)
def test_the_template_follows_the_rule(policy, rule):
    assert RULES[rule](policy) == []


# --- broken copies: every checker can fail ---------------------------------------------------


def _find(stmts: list[dict], predicate) -> dict:
    found = [s for s in stmts if predicate(s)]
    assert found, "the template has no such statement to break"
    return found[0]


def _drop(stmt: dict, operator: str, key: str | None = None) -> None:
    if key is None:
        del stmt["Condition"][operator]
    else:
        del stmt["Condition"][operator][key]


def _drop_create_action(p):
    _drop(
        _find(p.head, lambda s: condition(s, "StringEquals", "ec2:CreateAction")),
        "StringEquals",
        "ec2:CreateAction",
    )


def _drop_tag_keys(p):
    stmt = _find(p.head, lambda s: "ForAllValues:StringNotEquals" in s.get("Condition", {}))
    _drop(stmt, "ForAllValues:StringNotEquals")


def _drop_resource_tag_from_retag(p):
    stmt = _find(p.head, lambda s: "ForAllValues:StringNotEquals" in s.get("Condition", {}))
    _drop(stmt, "StringEquals", f"aws:ResourceTag/{CLUSTER_TAG}")


def _unconditional_terminate(p):
    stmt = _find(p.head, lambda s: allows(s, "ec2:TerminateInstances"))
    stmt.pop("Condition")
    stmt["Resource"] = ["*"]


def _drop_instance_type(p):
    _drop(
        _find(p.head, lambda s: condition(s, "StringEquals", "ec2:InstanceType")),
        "StringEquals",
        "ec2:InstanceType",
    )


def _extra_instance_type(p):
    p.params["InstanceTypes"]["Default"] += ",p4d.24xlarge"


def _instance_type_on_volumes(p):
    stmt = _find(p.head, lambda s: any(resource_type(r) == "volume" for r in s.get("Resource", [])))
    stmt["Condition"] = {"StringEquals": {"ec2:InstanceType": {"Ref": "InstanceTypes"}}}


def _any_subnet(p):
    stmt = _find(p.head, lambda s: s.get("Resource") == [SUBNET_ARNS])
    stmt["Resource"] = [{"Fn::Sub": "arn:${AWS::Partition}:ec2:${AWS::Region}:${AWS::AccountId}:subnet/*"}]


def _run_on_any_resource(p):
    p.head.append({"Effect": "Allow", "Action": ["ec2:RunInstances"], "Resource": ["*"]})


def _pass_any_role(p):
    _find(p.head, lambda s: allows(s, "iam:PassRole"))["Resource"] = ["*"]


def _wildcard_action(p):
    _find(p.head, lambda s: allows(s, "ec2:DescribeInstances"))["Action"].append("ec2:*")


def _worker_launches(p):
    p.worker["Properties"]["Policies"][0]["PolicyDocument"]["Statement"].append(
        {"Effect": "Allow", "Action": "ec2:RunInstances", "Resource": "*"}
    )


def _plain_string_arn(p):
    stmt = _find(p.head, lambda s: allows(s, "ec2:StopInstances"))
    stmt["Resource"] = [arn_text(stmt["Resource"][0])]


@pytest.mark.parametrize(
    "break_it, checker",
    [
        (_drop_create_action, create_tags_problems),
        (_drop_tag_keys, create_tags_problems),
        (_drop_resource_tag_from_retag, create_tags_problems),
        (_unconditional_terminate, lifecycle_problems),
        (_drop_instance_type, run_instances_problems),
        (_extra_instance_type, run_instances_problems),
        (_instance_type_on_volumes, run_instances_problems),
        (_any_subnet, run_instances_problems),
        (_run_on_any_resource, run_instances_problems),
        (_run_on_any_resource, any_resource_problems),
        (_pass_any_role, pass_role_problems),
        (_wildcard_action, wildcard_problems),
        (_worker_launches, worker_problems),
        (_plain_string_arn, grammar_problems),
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_checkers_reject_broken_copies(policy, break_it, checker):
    assert checker(policy) == []
    broken = copy.deepcopy(policy)
    break_it(broken)
    assert checker(broken), f"{checker.__name__} accepted {break_it.__name__}"
