"""The Helm chart (deploy/helm/kvrelay) through the real helm binary: `helm lint --strict` and
`helm template` for the default values and the value sets in the chart's ci/ folder, every
rendered manifest validated — built-in kinds with kubernetes-validate --strict, RayCluster and
ServiceMonitor against the CRD schemas in tests/data/crds (unknown fields rejected, as
`kubectl apply --validate=strict` does), RayCluster pod templates as core/v1 PodTemplates.

helm comes from scripts/test-tools.sh (.tools/bin/helm) or PATH; without it the tests skip.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "kvrelay"
CRDS = ROOT / "tests" / "data" / "crds"
K8S_VERSION = kubernetes_validate.latest_version()


def _helm() -> str | None:
    local = ROOT / ".tools" / "bin" / "helm"
    return str(local) if local.is_file() else shutil.which("helm")


HELM = _helm()
pytestmark = pytest.mark.skipif(
    HELM is None, reason="helm not found in .tools/bin or PATH (run scripts/test-tools.sh)"
)

CI_SETS = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
VALUE_SETS = ["default", *CI_SETS]


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert HELM is not None
    proc = subprocess.run(
        [HELM, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "HOME": str(ROOT / ".tools"),
            "HELM_CACHE_HOME": "/tmp/helm-cache",
        },
    )
    if check and proc.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def value_args(name: str) -> list[str]:
    return [] if name == "default" else ["-f", str(CHART / "ci" / name)]


def render(*args: str) -> list[dict[str, Any]]:
    out = helm("template", "kv", str(CHART), "--namespace", "serving", *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def strict(schema: Any) -> Any:
    """The CRD schema with unknown fields rejected wherever it lists properties, as the API
    server's strict field validation does (x-kubernetes-preserve-unknown-fields stays open)."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def crd_schema(filename: str) -> dict[str, Any]:
    crd = yaml.safe_load((CRDS / filename).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return strict(version["schema"]["openAPIV3Schema"])


CUSTOM = {
    ("ray.io/v1", "RayCluster"): crd_schema("raycluster.yaml"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): crd_schema("servicemonitor.yaml"),
}


def validate_manifest(doc: dict[str, Any]) -> None:
    key = (doc["apiVersion"], doc["kind"])
    if key in CUSTOM:
        jsonschema.validate(doc, CUSTOM[key], cls=jsonschema.Draft7Validator)
        if doc["kind"] == "RayCluster":
            spec = doc["spec"]
            for tmpl in [spec["headGroupSpec"]["template"]] + [
                g["template"] for g in spec.get("workerGroupSpecs", [])
            ]:
                pod_template = {
                    "apiVersion": "v1",
                    "kind": "PodTemplate",
                    "metadata": {"name": "t"},
                    "template": copy.deepcopy(tmpl),
                }
                kubernetes_validate.validate(pod_template, K8S_VERSION, strict=True)
        return
    # built-in kinds; an unknown kind raises SchemaNotFoundError rather than passing
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


@pytest.mark.parametrize("values", VALUE_SETS)
def test_lint_strict(values: str) -> None:
    proc = helm("lint", "--strict", str(CHART), *value_args(values))
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("values", VALUE_SETS)
def test_rendered_manifests_validate(values: str) -> None:
    docs = render(*value_args(values))
    kinds = {d["kind"] for d in docs}
    assert {"RayCluster", "Service", "ServiceAccount", "ClusterRole", "Role"} <= kinds
    for doc in docs:
        try:
            validate_manifest(doc)
        except Exception as e:  # name the manifest in the failure
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} ({values}): {e}")


def test_at_least_three_value_sets_besides_default() -> None:
    assert {"tls-auth-values.yaml", "spot-gpu-values.yaml", "servicemonitor-values.yaml"} <= set(
        CI_SETS
    )


def test_validation_catches_a_wrong_manifest() -> None:
    """The validators above are not vacuous: a typo'd field fails each of them."""
    docs = render()
    (rc,) = by_kind(docs, "RayCluster")
    bad = copy.deepcopy(rc)
    bad["spec"]["workerGroupSpecs"][0]["replica"] = 3
    with pytest.raises(jsonschema.ValidationError):
        validate_manifest(bad)
    bad = copy.deepcopy(rc)
    bad["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_manifest(bad)
    svc = copy.deepcopy(by_kind(docs, "Service")[0])
    svc["spec"]["ports"][0]["prot"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_manifest(svc)


def head_script(rc: dict[str, Any]) -> str:
    (container,) = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    return container["args"][0]


def test_default_render_layout() -> None:
    docs = render()
    (rc,) = by_kind(docs, "RayCluster")
    assert rc["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    script = head_script(rc)
    assert "ray start --head --port=6379" in script
    assert "exec kvrelay serve" in script
    assert "--prefill-workers=1" in script and "--decode-workers=1" in script
    assert "--model" not in script  # built-in default model
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]
    ports = {p["name"]: p["containerPort"] for p in head["containers"][0]["ports"]}
    assert ports == {
        "gcs-server": 6379,
        "dashboard": 8265,
        "client": 10001,
        "grpc": 50051,
        "http": 8000,
        "http-metrics": 9090,
    }
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    assert set(groups) == {"prefill", "decode"}
    for role, g in groups.items():
        # KubeRay's format: a JSON object inside a quoted string
        resources = json.loads(json.loads(g["rayStartParams"]["resources"]))
        assert resources == {f"kvrelay_{role}": 1}
        pod = g["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert pod["terminationGracePeriodSeconds"] == 120
        assert "nvidia.com/gpu" not in pod["containers"][0]["resources"]["requests"]
    (svc,) = by_kind(docs, "Service")
    assert svc["spec"]["selector"] == {
        "ray.io/cluster": rc["metadata"]["name"],
        "ray.io/node-type": "head",
    }
    assert {p["name"] for p in svc["spec"]["ports"]} == {"grpc", "http", "http-metrics"}
    assert not by_kind(docs, "ServiceMonitor")


def test_rbac_reads_nodes_and_pods_only() -> None:
    docs = render()
    rules = [r for d in by_kind(docs, "ClusterRole") + by_kind(docs, "Role") for r in d["rules"]]
    assert sorted(r for rule in rules for r in rule["resources"]) == ["nodes", "pods"]
    for rule in rules:
        assert rule["apiGroups"] == [""]
        assert sorted(rule["verbs"]) == ["get", "list", "watch"]
    (sa,) = by_kind(docs, "ServiceAccount")
    (rc,) = by_kind(docs, "RayCluster")
    assert (
        rc["spec"]["headGroupSpec"]["template"]["spec"]["serviceAccountName"]
        == sa["metadata"]["name"]
    )
    for binding in by_kind(docs, "ClusterRoleBinding") + by_kind(docs, "RoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "serving"}
        ]


def test_dashboard_configmap_carries_the_generated_dashboard() -> None:
    (cm,) = by_kind(render(), "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((ROOT / "deploy" / "grafana" / "kvrelay.json").read_text())
    assert json.loads(cm["data"]["kvrelay.json"]) == shipped


def test_spot_gpu_values() -> None:
    docs = render(*value_args("spot-gpu-values.yaml"))
    (rc,) = by_kind(docs, "RayCluster")
    assert rc["spec"]["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in rc["spec"]["workerGroupSpecs"]}
    for role, gpus, replicas in (("prefill", 1, 2), ("decode", 2, 2)):
        g = groups[role]
        assert g["replicas"] == replicas
        assert json.loads(json.loads(g["rayStartParams"]["resources"])) == {f"kvrelay_{role}": gpus}
        pod = g["template"]["spec"]
        res = pod["containers"][0]["resources"]
        assert res["limits"]["nvidia.com/gpu"] == gpus == res["requests"]["nvidia.com/gpu"]
        assert pod["nodeSelector"]["karpenter.sh/capacity-type"] == "spot"
        assert any(t["key"] == "cloud.google.com/gke-spot" for t in pod["tolerations"])
        assert pod["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        grace = pod["terminationGracePeriodSeconds"]
        sleep = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1]
        assert int(sleep.split()[-1]) < grace
        assert {
            "name": "model",
            "persistentVolumeClaim": {"claimName": "models", "readOnly": True},
        } in pod["volumes"]
    # the decode group keeps its own GPU toleration and node selector besides the spot ones
    dpod = groups["decode"]["template"]["spec"]
    assert dpod["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert any(t["key"] == "nvidia.com/gpu" for t in dpod["tolerations"])
    script = head_script(rc)
    assert "--prefill-workers=2" in script and "--decode-workers=4" in script
    assert "--model='/models/Llama-3.1-8B-Instruct'" in script
    assert "nodeSelector" in rc["spec"]["headGroupSpec"]["template"]["spec"]


def test_tls_auth_values() -> None:
    docs = render(*value_args("tls-auth-values.yaml"))
    (rc,) = by_kind(docs, "RayCluster")
    script = head_script(rc)
    for flag in (
        "--tls-cert-file=/etc/kvrelay/tls/tls.crt",
        "--tls-key-file=/etc/kvrelay/tls/tls.key",
        "--api-key-file=/etc/kvrelay/auth/api-keys",
        "--admin-key-file=/etc/kvrelay/auth/admin-keys",
    ):
        assert flag in script
    head = rc["spec"]["headGroupSpec"]["template"]["spec"]
    vols = {v["name"]: v for v in head["volumes"]}
    assert vols["tls"]["secret"]["secretName"] == "kvrelay-frontend-tls"  # existingSecret
    secrets = {s["metadata"]["name"]: s for s in by_kind(docs, "Secret")}
    auth = secrets[vols["auth"]["secret"]["secretName"]]
    assert auth["stringData"]["api-keys"].split() == ["ci-user-key-0001", "ci-user-key-0002"]
    assert auth["stringData"]["admin-keys"].split() == ["ci-admin-key-0001"]
    # no TLS or Ray-token Secret rendered: both come from existing Secrets
    assert all(s["type"] != "kubernetes.io/tls" for s in secrets.values())
    env = {e["name"]: e for e in head["containers"][0]["env"]}
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "kvrelay-ray-token"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_tls_inline_certificate(tmp_path: Path) -> None:
    crt, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=kvrelay.test",
            "-keyout",
            str(key),
            "-out",
            str(crt),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    args = [
        "--set",
        "tls.enabled=true",
        "--set-file",
        f"tls.cert={crt}",
        "--set-file",
        f"tls.key={key}",
    ]
    helm("lint", "--strict", str(CHART), *args)
    docs = render(*args)
    for doc in docs:
        validate_manifest(doc)
    (tls,) = [s for s in by_kind(docs, "Secret") if s["type"] == "kubernetes.io/tls"]
    import base64

    assert base64.b64decode(tls["data"]["tls.crt"]).decode() == crt.read_text()


def test_servicemonitor_values() -> None:
    docs = render(*value_args("servicemonitor-values.yaml"))
    (sm,) = by_kind(docs, "ServiceMonitor")
    (svc,) = by_kind(docs, "Service")
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    sel = sm["spec"]["selector"]["matchLabels"]
    assert sel.items() <= svc["metadata"]["labels"].items()  # it selects our frontend Service
    (ep,) = sm["spec"]["endpoints"]
    assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]} and ep["path"] == "/metrics"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["serving"]}
    (rc,) = by_kind(docs, "RayCluster")
    assert [g["groupName"] for g in rc["spec"]["workerGroupSpecs"]] == ["decode"]
    script = head_script(rc)
    assert "--prefill-workers=0" in script
    assert "--model='/models/qwen2.5-0.5b-instruct-q8_0.gguf'" in script
    assert "'--max-concurrent-streams=256'" in script
    vols = {v["name"]: v for v in rc["spec"]["headGroupSpec"]["template"]["spec"]["volumes"]}
    assert vols["model"]["hostPath"] == {"path": "/mnt/models", "type": "Directory"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "tls.enabled=true"], "tls.enabled needs"),
        (["--set", "auth.enabled=true"], "auth.enabled needs"),
        (["--set", "model.source=pvc", "--set", "model.path=m"], "model.pvc.claimName"),
        (["--set", "model.source=hostPath", "--set", "model.hostPath.path=/x"], "model.path"),
        (["--set", "prefill.replicas=9"], "minReplicas <= replicas <= maxReplicas"),
        (["--set", "decode.preStopSleepSeconds=500"], "preStopSleepSeconds"),
        (
            [
                "--set",
                "model.path=a'b",
                "--set",
                "model.source=hostPath",
                "--set",
                "model.hostPath.path=/x",
            ],
            "model/path",
        ),
        (["--set", "prefil.gpus=1"], "additional properties 'prefil' not allowed"),
    ],
)
def test_bad_values_fail_with_a_clear_message(args: list[str], message: str) -> None:
    proc = helm("template", "kv", str(CHART), *args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def test_image_provides_the_command_the_chart_runs() -> None:
    """The chart runs `ray` and `kvrelay` from the image: the Dockerfile installs this package,
    whose console script `kvrelay` is declared in pyproject.toml."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert dockerfile.splitlines()[0].startswith("# syntax=") or "FROM" in dockerfile
    assert "FROM python:3.11-slim" in dockerfile
    assert "ARG TORCH_INDEX_URL" in dockerfile
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is 3.11+; the project allows 3.10)
    assert re.search(r'^kvrelay = "kvrelay\.cluster\.cli\.main:main"$', pyproject, re.M)
    (rc,) = by_kind(render(), "RayCluster")
    assert rc["spec"]["rayVersion"].split(".")[0] == "2"


def _stub_bin(tmp_path: Path) -> tuple[Path, Path]:
    """`ray` and `kvrelay` stand-ins that append their argv (JSON) to a log."""
    bindir, log = tmp_path / "bin", tmp_path / "argv.jsonl"
    bindir.mkdir()
    for tool in ("ray", "kvrelay"):
        stub = bindir / tool
        stub.write_text(
            "#!/usr/bin/env python3\nimport json, sys\n"
            f"open({str(log)!r}, 'a').write(json.dumps([{tool!r}, *sys.argv[1:]]) + '\\n')\n"
        )
        stub.chmod(0o755)
    return bindir, log


def _run_script(script: str, bindir: Path, **env: str) -> subprocess.CompletedProcess[str]:
    # bash -c rather than the pod's -lc: a login shell would reset PATH and lose the stubs
    return subprocess.run(
        ["/bin/bash", "-c", "--", script],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": f"{bindir}:/usr/bin:/bin", **env},
    )


def test_head_script_runs_ray_then_kvrelay_with_the_intended_argv(tmp_path: Path) -> None:
    bindir, log = _stub_bin(tmp_path)
    (rc,) = by_kind(render(*value_args("servicemonitor-values.yaml")), "RayCluster")
    proc = _run_script(head_script(rc), bindir, KVRELAY_POD_NAMESPACE="serving")
    assert proc.returncode == 0, proc.stderr
    ray, kvrelay = (json.loads(line) for line in log.read_text().splitlines())
    assert ray[:3] == ["ray", "start", "--head"] and "--block" not in ray
    assert "--dashboard-host=0.0.0.0" in ray and "--num-gpus=0" in ray
    assert "--metrics-export-port=8080" in ray
    assert kvrelay == [
        "kvrelay",
        "serve",
        "--address=127.0.0.1:6379",
        "--host=0.0.0.0",
        "--grpc-port=50051",
        "--http-port=8000",
        "--metrics-port=9090",
        "--prefill-workers=0",
        "--decode-workers=1",
        "--placement-resource-prefix=kvrelay_",
        "--model=/models/qwen2.5-0.5b-instruct-q8_0.gguf",
        "--k8s-watch",
        "--k8s-namespace=serving",
        "--max-concurrent-streams=256",
    ]


def test_worker_script_joins_with_its_role_resource(tmp_path: Path) -> None:
    bindir, log = _stub_bin(tmp_path)
    (rc,) = by_kind(render(*value_args("spot-gpu-values.yaml")), "RayCluster")
    decode = next(g for g in rc["spec"]["workerGroupSpecs"] if g["groupName"] == "decode")
    script = decode["template"]["spec"]["containers"][0]["args"][0]
    # what KubeRay puts in KUBERAY_GEN_RAY_START_CMD: rayStartParams values verbatim
    generated = (
        "ray start  --address=kv-kvrelay-head-svc.serving.svc.cluster.local:6379  "
        f"--resources={decode['rayStartParams']['resources']}  --num-gpus=2  --block"
    )
    proc = _run_script(script, bindir, KUBERAY_GEN_RAY_START_CMD=generated)
    assert proc.returncode == 0, proc.stderr
    (argv,) = (json.loads(line) for line in log.read_text().splitlines())
    (res,) = [a for a in argv if a.startswith("--resources=")]
    assert json.loads(res.removeprefix("--resources=")) == {"kvrelay_decode": 2}
    assert argv[-1] == "--block"
    missing = _run_script(script, bindir)
    assert missing.returncode != 0 and "needs KubeRay >= 1.1" in missing.stderr


def test_network_policy_admits_internal_ports_only_from_the_release() -> None:
    docs = render()
    (policy,) = by_kind(docs, "NetworkPolicy")
    own = {"app.kubernetes.io/name": "kvrelay", "app.kubernetes.io/instance": "kv"}
    assert policy["spec"]["podSelector"] == {"matchLabels": own}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rc,) = by_kind(docs, "RayCluster")
    pods = [rc["spec"]["headGroupSpec"]["template"]] + [
        g["template"] for g in rc["spec"]["workerGroupSpecs"]
    ]
    for pod in pods:  # every pod of the release is selected, and counts as "own"
        assert own.items() <= pod["metadata"]["labels"].items()
    public = {50051, 8000, 9090}
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        if ports:  # a rule that opens ports to other sources opens only the public ones
            assert ports <= public, rule
        else:  # a rule for every port: only from this release's pods
            assert rule["from"] == [{"podSelector": {"matchLabels": own}}], rule
    narrowed = render("--set-json",
                      'networkPolicy.apiFrom=[{"namespaceSelector":{"matchLabels":{"a":"b"}}}]')
    (policy,) = by_kind(narrowed, "NetworkPolicy")
    api = next(r for r in policy["spec"]["ingress"] if 8000 in {p["port"] for p in r.get("ports", [])})
    assert api["from"] == [{"namespaceSelector": {"matchLabels": {"a": "b"}}}]
    assert not by_kind(render("--set", "networkPolicy.enabled=false"), "NetworkPolicy")


@pytest.mark.parametrize("tls", [False, True])
def test_head_has_startup_readiness_and_liveness_probes(tls: bool) -> None:
    args = ["--set", "tls.enabled=true", "--set", "tls.existingSecret=certs"] if tls else []
    (rc,) = by_kind(render(*args), "RayCluster")
    (head,) = rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    scheme = "HTTPS" if tls else "HTTP"
    for probe, path in (("startupProbe", "/ready"), ("readinessProbe", "/ready"),
                        ("livenessProbe", "/health")):
        assert head[probe]["httpGet"] == {"path": path, "port": "http", "scheme": scheme}
        assert head[probe]["periodSeconds"] >= 1
    # the model may take minutes to load: startup allows it, liveness waits for startup
    startup = head["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
