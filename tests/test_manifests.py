"""The Kubernetes example runs Kaito's command and probes every pod on port 5000."""

import glob
import os
import shlex

import yaml

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
            assert argv[0] == "torchrun" and "inference_api.py" in argv
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
