#!/usr/bin/env python3
"""Validates manifests rendered by `helm template` (scripts/check-helm.sh runs it).

Every object is checked offline against the Kubernetes 1.37 JSON schemas shipped in the
`kubernetes-validate` package, strictly (unknown fields are errors). The only kind without a
built-in schema, the Prometheus Operator's ServiceMonitor (a CRD), is skipped there and checked
here by hand instead (selector and port). Any other kind without a schema is an error.

Then what a schema cannot see: selectors match the pods they mean to, the HPA and the
StatefulSet name objects that exist, probes hit /healthz and /readyz, containers are non-root
with a read-only root filesystem, the grace period outlasts preStop + the app's shutdown grace,
and the rendered kinds are the expected ones.

usage: validate-manifests.py CASE FILE --expect Kind=N[,Kind=N…]
Prints one line; exits 1 with every problem listed when anything is wrong.
"""

import argparse
import collections
import re
import sys

import kubernetes_validate
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

K8S_VERSION = "1.37.0"
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("case")
    ap.add_argument("file")
    ap.add_argument("--expect", required=True, help="Kind=N,… exactly the kinds rendered")
    args = ap.parse_args()

    with open(args.file) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    problems = []
    skipped = []

    for d in docs:
        name = f"{d.get('kind')}/{d.get('metadata', {}).get('name')}"
        if (d.get("apiVersion"), d.get("kind")) in CRD_KINDS:
            skipped.append(name)
            continue
        try:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            problems.append(f"{name}: {path}: {e.message}")
        except SchemaNotFoundError as e:
            problems.append(f"{name}: {e.message}")

    # What was rendered, against what the case expects.
    kinds = collections.Counter(d["kind"] for d in docs)
    want = collections.Counter()
    for part in args.expect.split(","):
        k, n = part.split("=")
        want[k] = int(n)
    if kinds != want:
        problems.append(f"rendered kinds {dict(sorted(kinds.items()))}, expected {dict(sorted(want.items()))}")

    by_kind = collections.defaultdict(list)
    for d in docs:
        by_kind[d["kind"]].append(d)
    workloads = by_kind["Deployment"] + by_kind["StatefulSet"]
    pod_labels = [w["spec"]["template"]["metadata"]["labels"] for w in workloads]
    config = {}
    for cm in by_kind["ConfigMap"]:
        text = cm.get("data", {}).get("config.toml", "")
        for line in text.splitlines():
            m = re.match(r"^(\w+) = (.*)$", line)
            if m:
                config[m.group(1)] = m.group(2)

    for w in workloads:
        name = f"{w['kind']}/{w['metadata']['name']}"
        spec = w["spec"]
        pod = spec["template"]["spec"]
        if not matches(spec["selector"]["matchLabels"], spec["template"]["metadata"]["labels"]):
            problems.append(f"{name}: selector does not match its pod labels")
        psc = pod.get("securityContext", {})
        if not psc.get("runAsNonRoot"):
            problems.append(f"{name}: pod securityContext.runAsNonRoot is not true")
        grace = pod.get("terminationGracePeriodSeconds", 30)
        for c in pod["containers"]:
            sc = c.get("securityContext", {})
            if not sc.get("readOnlyRootFilesystem") or sc.get("allowPrivilegeEscalation", True):
                problems.append(f"{name}: container {c['name']} needs a read-only root fs and no privilege escalation")
            if (c.get("livenessProbe") or {}).get("httpGet", {}).get("path") != "/healthz":
                problems.append(f"{name}: liveness probe is not GET /healthz")
            if (c.get("readinessProbe") or {}).get("httpGet", {}).get("path") != "/readyz":
                problems.append(f"{name}: readiness probe is not GET /readyz")
            pre = (((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds", 0)
            app_grace = int(config.get("shutdown_grace_secs", "20"))
            if grace <= pre + app_grace:
                problems.append(f"{name}: terminationGracePeriodSeconds {grace} <= preStop {pre} + shutdown_grace_secs {app_grace}")
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            vols = {v["name"] for v in pod.get("volumes", [])}
            vols |= {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates", [])}
            if mounts - vols:
                problems.append(f"{name}: mounts without a volume: {sorted(mounts - vols)}")
            for m in c.get("volumeMounts", []):
                if m["mountPath"] in ("/data", "/tmp") and m.get("readOnly"):
                    problems.append(f"{name}: {m['mountPath']} must be writable")
            if not {"/data", "/tmp"} <= {m["mountPath"] for m in c.get("volumeMounts", [])}:
                problems.append(f"{name}: /data and /tmp must be writable volumes (read-only root fs)")
        for v in pod.get("volumes", []):
            if "configMap" in v and v["configMap"]["name"] not in {cm["metadata"]["name"] for cm in by_kind["ConfigMap"]}:
                problems.append(f"{name}: volume {v['name']} names a ConfigMap the chart does not render")
        if w["kind"] == "StatefulSet":
            if spec.get("replicas") != 1:
                problems.append(f"{name}: the embedded StatefulSet must have exactly 1 replica (one SQLite writer)")
            if spec.get("serviceName") not in {s["metadata"]["name"] for s in by_kind["Service"]}:
                problems.append(f"{name}: serviceName {spec.get('serviceName')} is not a rendered Service")

    services = {}
    for s in by_kind["Service"]:
        name = f"Service/{s['metadata']['name']}"
        services[s["metadata"]["name"]] = s
        sel = s["spec"].get("selector", {})
        targets = [w for w, l in zip(workloads, pod_labels) if matches(sel, l)]
        if not targets:
            problems.append(f"{name}: selector {sel} matches no pod template")
        for p in s["spec"]["ports"]:
            tp = p.get("targetPort", p["port"])
            for w in targets:
                ports = [cp for c in w["spec"]["template"]["spec"]["containers"] for cp in c.get("ports", [])]
                if not any(tp in (cp.get("name"), cp["containerPort"]) for cp in ports):
                    problems.append(f"{name}: targetPort {tp} is not a port of {w['metadata']['name']}")

    deployments = {d["metadata"]["name"]: d for d in by_kind["Deployment"]}
    for h in by_kind["HorizontalPodAutoscaler"]:
        ref = h["spec"]["scaleTargetRef"]
        target = deployments.get(ref["name"])
        if ref["kind"] != "Deployment" or target is None:
            problems.append(f"HorizontalPodAutoscaler/{h['metadata']['name']}: scales {ref['kind']}/{ref['name']}, not a rendered Deployment")
        elif "replicas" in target["spec"]:
            problems.append(f"Deployment/{ref['name']}: sets replicas although an HPA scales it (every upgrade would reset the scale)")
    for p in by_kind["PodDisruptionBudget"]:
        if not any(matches(p["spec"]["selector"]["matchLabels"], l) for l in pod_labels):
            problems.append(f"PodDisruptionBudget/{p['metadata']['name']}: selector matches no pod template")

    for sm in by_kind["ServiceMonitor"]:
        name = f"ServiceMonitor/{sm['metadata']['name']}"
        sel = sm["spec"]["selector"]["matchLabels"]
        hits = [s for s in services.values() if matches(sel, s["metadata"].get("labels", {}))]
        if len(hits) != 1:
            problems.append(f"{name}: selector should match exactly one Service, matches {len(hits)}")
        for ep in sm["spec"]["endpoints"]:
            if not all(any(p.get("name") == ep["port"] for p in s["spec"]["ports"]) for s in hits):
                problems.append(f"{name}: endpoint port {ep['port']} is not a named port of the selected Service")
            if not ep.get("path", "").startswith("/"):
                problems.append(f"{name}: endpoint path must start with /")

    if problems:
        print(f"FAIL {args.case}: {len(problems)} problem(s)")
        for p in problems:
            print(f"  - {p}")
        return 1
    note = f", {len(skipped)} skipped from schema validation ({', '.join(skipped)}: CRD, no built-in schema; checked by hand)" if skipped else ""
    print(f"{args.case}: {len(docs) - len(skipped)} objects valid against Kubernetes {K8S_VERSION} schemas (strict){note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
