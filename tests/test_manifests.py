"""Kubernetes and Kaito manifests: schema-valid, Kaito's command, probes on every pod, Pod Security's restricted
profile."""

import glob
import os
import shlex
import subprocess
import sys

import jsonschema
import pytest
import yaml
from dockerfile_parse import DockerfileParser

from presets.servers.llama import TORCHRUN_DRAIN
from tests.launch import ROOT


def docs():
    for path in glob.glob(os.path.join(ROOT, "examples", "kubernetes", "*.yaml")):
        with open(path) as f:
            yield path, [d for d in yaml.safe_load_all(f) if d]


def test_statefulset_runs_kaitos_torchrun_command_with_probes_and_shm():
    found = False
    for path, objects in docs():
        for sts in (o for o in objects if o["kind"] == "StatefulSet"):
            found = True
            pod = sts["spec"]["template"]["spec"]
            (container,) = pod["containers"]
            script = container["command"][-1]
            argv = shlex.split(script.split("&&", 1)[1])
            assert script.startswith("cd /workspace/llama/llama-2 &&"), path
            assert argv[:2] == ["exec", "torchrun"] and "inference_api.py" in argv  # SIGTERM reaches torchrun
            argv = argv[1:]
            assert pod["terminationGracePeriodSeconds"] > TORCHRUN_DRAIN + 5  # the drain ends before SIGKILL
            assert argv[argv.index("--nnodes") + 1] == str(sts["spec"]["replicas"])
            assert argv[argv.index("inference_api.py") + 1 :] == ["--max_seq_len", "512", "--max_batch_size", "8"]
            for probe in ("livenessProbe", "readinessProbe"):
                assert container[probe]["httpGet"] == {"path": "/healthz", "port": 5000}
            assert container["livenessProbe"]["initialDelaySeconds"] == 600
            assert container["readinessProbe"]["initialDelaySeconds"] == 30
            shm = [v for v in container["volumeMounts"] if v["mountPath"] == "/dev/shm"]
            assert shm and any(
                v["name"] == shm[0]["name"] and v["emptyDir"]["medium"] == "Memory" for v in pod["volumes"]
            )
            services = [o for o in objects if o["kind"] == "Service"]
            assert any(s["spec"].get("clusterIP") == "None" for s in services)  # headless, for the rendezvous
            assert any(p["port"] == 80 and p["targetPort"] == 5000 for s in services for p in s["spec"]["ports"])
    assert found


def test_kubernetes_manifests_validate_strictly():
    paths = glob.glob(os.path.join(ROOT, "examples", "kubernetes", "*.yaml"))
    assert paths
    out = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "kubernetes-validate"), "--strict", *paths],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr


KAITO_PRESETS = {f"llama-2-{size}{chat}" for size in ("7b", "13b", "70b") for chat in ("", "-chat")} | {
    f"falcon-{size}{instruct}" for size in ("7b", "40b") for instruct in ("", "-instruct")
}


@pytest.mark.parametrize("version, folder", [("v1alpha1", ""), ("v1beta1", "v1beta1")])
def test_kaito_workspaces_match_the_crd_schema_for_every_preset(version, folder):
    with open(os.path.join(ROOT, "tests", "data", "kaito", "kaito.sh_workspaces.yaml")) as f:  # vendored, see README
        crd = yaml.safe_load(f)
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = served["schema"]["openAPIV3Schema"]
    seen = {}
    for path in glob.glob(os.path.join(ROOT, "examples", "kaito", folder, "*.yaml")):
        with open(path) as f:
            ws = yaml.safe_load(f)
        jsonschema.validate(ws, schema)
        assert ws["apiVersion"] == f"kaito.sh/{version}" and ws["kind"] == "Workspace", path
        preset = ws["inference"]["preset"]
        assert preset["accessMode"] == "private" and preset["presetOptions"]["image"], path
        seen[preset["name"]] = {k: v for k, v in ws.items() if k != "apiVersion"}
    assert set(seen) == KAITO_PRESETS
    if version == "v1beta1":  # the same Workspaces as the v1alpha1 ones, but for their apiVersion
        for name, ws in seen.items():
            with open(os.path.join(ROOT, "examples", "kaito", f"workspace-{name}.yaml")) as f:
                assert {k: v for k, v in yaml.safe_load(f).items() if k != "apiVersion"} == ws


def test_kaito_workspace_with_adapters_matches_the_crd_and_names_adapters_we_serve(tmp_path):
    from presets.engine.adapters import adapter_specs

    with open(os.path.join(ROOT, "tests", "data", "kaito", "kaito.sh_workspaces.yaml")) as f:
        crd = yaml.safe_load(f)
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
    with open(os.path.join(ROOT, "examples", "kaito", "adapters", "workspace-llama-2-7b-chat-adapters.yaml")) as f:
        ws = yaml.safe_load(f)
    jsonschema.validate(ws, served["schema"]["openAPIV3Schema"])
    adapters = ws["inference"]["adapters"]
    # What Kaito makes of them (/mnt/adapter/<name>/, <name>=<strength>) is what the server reads.
    env = {a["source"]["name"]: a["strength"] for a in adapters}
    for name in env:
        (tmp_path / name).mkdir()
    specs = adapter_specs([], str(tmp_path), env)
    assert {(s.name, s.strength) for s in specs} == {(n, float(v)) for n, v in env.items()}


def test_kaito_template_workspaces_validate_and_run_our_servers(tmp_path):
    """Current Kaito's form for a custom server: each Workspace matches the CRD, its pod template is a valid
    Kubernetes PodTemplate (kubernetes-validate, strict, offline), and its container is our server as run."""
    with open(os.path.join(ROOT, "tests", "data", "kaito", "kaito.sh_workspaces.yaml")) as f:
        crd = yaml.safe_load(f)
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1beta1"]
    paths = sorted(glob.glob(os.path.join(ROOT, "examples", "kaito", "template", "*.yaml")))
    templates = []
    for path in paths:
        with open(path) as f:
            ws = yaml.safe_load(f)
        jsonschema.validate(ws, served["schema"]["openAPIV3Schema"])
        assert "preset" not in ws["inference"], path  # Kaito takes one of preset and template
        template = ws["inference"]["template"]
        (container,) = template["spec"]["containers"]
        (port,) = [p["containerPort"] for p in container["ports"]]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["httpGet"] == {"path": "/health", "port": port}, path
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        if "command" in container:  # the Llama servers: torchrun with a rank per GPU, exec'd so SIGTERM reaches it
            script = container["command"][-1]
            argv = shlex.split(script.split("&&", 1)[1])
            assert script.startswith("cd /workspace/llama/llama-2 &&") and argv[:2] == ["exec", "torchrun"], path
            assert argv[argv.index("--nproc_per_node") + 1] == str(gpus), path
            assert any(v["mountPath"] == "/dev/shm" for v in container["volumeMounts"]), path
        name = os.path.basename(path).removesuffix(".yaml")
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template}
        out = tmp_path / f"{name}.yaml"
        out.write_text(yaml.safe_dump(pod_template))
        templates.append(str(out))
    assert len(paths) == 7
    kv = os.path.join(os.path.dirname(sys.executable), "kubernetes-validate")
    out = subprocess.run([kv, "--strict", *templates], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_monitoring_examples_scrape_our_pods_and_scale_on_a_metric_we_export():
    folder = os.path.join(ROOT, "examples", "kubernetes", "monitoring")
    with open(os.path.join(folder, "podmonitor.yaml")) as f:
        monitor = yaml.safe_load(f)
    with open(os.path.join(folder, "keda-scaledobject.yaml")) as f:
        scaled = yaml.safe_load(f)
    with open(os.path.join(ROOT, "examples", "kaito", "template", "workspace-llama-2-7b-chat.yaml")) as f:
        template = yaml.safe_load(f)["inference"]["template"]
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    (container,) = template["spec"]["containers"]
    assert endpoint["path"] == "/metrics" and endpoint["port"] in [p["name"] for p in container["ports"]]
    assert (scaled["apiVersion"], scaled["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and "vllm:num_requests_waiting" in trigger["metadata"]["query"]
    assert float(trigger["metadata"]["threshold"]) > 0


def pod_templates():
    """Every pod template of the examples: the Kaito template Workspaces' and the Kubernetes workloads'."""
    for path in sorted(glob.glob(os.path.join(ROOT, "examples", "kaito", "template", "*.yaml"))):
        with open(path) as f:
            yield path, yaml.safe_load(f)["inference"]["template"]["spec"]
    for path, objects in docs():
        for o in objects:
            if "template" in o.get("spec", {}):
                yield path, o["spec"]["template"]["spec"]


IMAGES = {  # the Dockerfile that builds each example's image, by the image's name
    "llm-api": os.path.join("docker", "presets", "inference", "llama-cpp", "Dockerfile"),
    "falcon": os.path.join("docker", "presets", "inference", "falcon", "Dockerfile"),
    "llama-2": os.path.join("docker", "presets", "inference", "llama-2", "Dockerfile"),
}


def restricted_violations(pod: dict) -> list[str]:
    """What Pod Security's `restricted` profile (Kubernetes 1.25+) refuses in a pod spec, for the fields it checks."""
    bad = [f"spec.{k}" for k in ("hostNetwork", "hostPID", "hostIPC") if pod.get(k)]
    bad += [f"volume {v['name']}: hostPath" for v in pod.get("volumes", []) if "hostPath" in v]
    sc = pod.get("securityContext", {})
    bad += [f"sysctl {s['name']}" for s in sc.get("sysctls", [])]
    for c in pod.get("containers", []) + pod.get("initContainers", []):
        csc = {**sc, **c.get("securityContext", {})}  # the container's fields override the pod's
        where = f"container {c['name']}"
        if csc.get("runAsNonRoot") is not True or csc.get("runAsUser", 1) == 0:
            bad.append(f"{where}: runAsNonRoot must be true, runAsUser non-zero")
        if csc.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{where}: seccompProfile.type must be RuntimeDefault or Localhost")
        if c.get("securityContext", {}).get("allowPrivilegeEscalation") is not False:
            bad.append(f"{where}: allowPrivilegeEscalation must be false")
        caps = c.get("securityContext", {}).get("capabilities", {})
        if "ALL" not in caps.get("drop", []) or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            bad.append(f"{where}: capabilities must drop ALL and add at most NET_BIND_SERVICE")
        if c.get("securityContext", {}).get("privileged") or any(p.get("hostPort") for p in c.get("ports", [])):
            bad.append(f"{where}: privileged or a hostPort")
    return bad


def test_restricted_violations_finds_what_the_profile_refuses():
    with open(os.path.join(ROOT, "examples", "kaito", "template", "workspace-llama-2-7b.yaml")) as f:
        good = yaml.safe_load(f)["inference"]["template"]["spec"]
    assert restricted_violations(good) == []
    for field in ("runAsNonRoot", "seccompProfile"):
        pod = {**good, "securityContext": {k: v for k, v in good["securityContext"].items() if k != field}}
        assert restricted_violations(pod), field
    (container,) = good["containers"]
    for change in ({"allowPrivilegeEscalation": True}, {"capabilities": {"drop": ["ALL"], "add": ["SYS_ADMIN"]}}):
        pod = {**good, "containers": [{**container, "securityContext": {**container["securityContext"], **change}}]}
        assert restricted_violations(pod), change


def test_every_example_pod_runs_restricted_as_the_images_user_with_its_writable_paths_mounted():
    """Pod Security's restricted profile, plus what the images need to run under it: their numeric USER as
    runAsUser/runAsGroup, a read-only root, and a volume at every path the server writes: /tmp (tempfile's
    folder and the images' HOME), /dev/shm where torchrun starts ranks (NCCL), llm-api's models_dir."""
    seen = 0
    for path, pod in pod_templates():
        seen += 1
        assert restricted_violations(pod) == [], path
        sc = pod["securityContext"]
        (container,) = pod["containers"]
        (kind,) = [k for k in IMAGES if k in container["image"]]
        image = DockerfileParser(path=os.path.join(ROOT, IMAGES[kind]))
        (user,) = [i["value"] for i in image.structure if i["instruction"] == "USER"]
        assert f"{sc['runAsUser']}:{sc['runAsGroup']}" == user and sc["fsGroup"] == sc["runAsGroup"], path
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, path
        needed = {"/tmp", image.envs["HOME"]}
        if "torchrun" in " ".join(container.get("command", [])):
            needed.add("/dev/shm")
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        if kind == "llm-api":
            needed.add(env["LLM_API_MODELS_DIR"])
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounted = {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}
        assert needed <= set(mounted), f"{path}: {sorted(needed - set(mounted))} not mounted"
        for folder in needed - {env.get("LLM_API_MODELS_DIR")}:  # scratch space: an emptyDir per pod
            assert "emptyDir" in mounted[folder], (path, folder)
        assert all(not m.get("readOnly") for m in container["volumeMounts"] if m["mountPath"] in needed), path
    assert seen == 8  # 7 template Workspaces and the StatefulSet
