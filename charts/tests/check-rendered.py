"""Checks what `helm template` rendered for each values file in charts/tests/values (RENDERED_DIR/<name>.yaml):
RBAC scope, Pod Security "restricted" fields, toggled objects, and that the alert pack and dashboard shipped are the
repository's. Also that values.schema.json covers every value and the values files exercise every value.
Usage: check-rendered.py CHART_DIR RENDERED_DIR"""

import json
import sys
from pathlib import Path

import yaml

chart, rendered = Path(sys.argv[1]), Path(sys.argv[2])
failures = []


def check(condition, message):
    if not condition:
        failures.append(message)


def leaves(tree, prefix=()):
    """Key paths of a values tree; lists and empty maps are leaves."""
    if isinstance(tree, dict) and tree:
        for key, value in tree.items():
            yield from leaves(value, prefix + (key,))
    else:
        yield prefix


def schema_has(schema, path):
    for key in path:
        if isinstance(schema.get("additionalProperties"), dict):
            return True  # a free-form map (labels, resources): its keys are the user's
        properties = schema.get("properties", {})
        if key not in properties:
            return False
        schema = properties[key]
    return True


values = yaml.safe_load((chart / "values.yaml").read_text())
schema = json.loads((chart / "values.schema.json").read_text())
exercised = set()
for values_file in (chart.parent / "tests" / "values").glob("*.yaml"):
    exercised |= {".".join(path) for path in leaves(yaml.safe_load(values_file.read_text()) or {})}
for path in leaves(values):
    name = ".".join(path)
    check(schema_has(schema, path), f"values.schema.json does not describe {name}")
    check(any(e == name or e.startswith(name + ".") for e in exercised), f"no charts/tests/values file sets {name}")


def load(name):
    docs = [doc for doc in yaml.safe_load_all((rendered / f"{name}.yaml").read_text()) if doc]
    return {(doc["kind"], doc["metadata"]["name"], doc["metadata"].get("namespace")): doc for doc in docs}


def kinds(objects):
    return sorted({kind for kind, _, _ in objects})


def one(objects, kind, name=None):
    found = [doc for (k, n, _), doc in objects.items() if k == kind and (name is None or n == name)]
    check(len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}")
    return found[0] if found else {}


def secret_rules(role):
    return [rule for rule in role.get("rules", []) if "secrets" in rule.get("resources", [])]


def watches_pods(role):
    return any("pods" in rule.get("resources", []) and {"list", "watch"} <= set(rule.get("verbs", []))
               for rule in role.get("rules", []))


def storage_class_verbs(role):
    return sorted(verb for rule in role.get("rules", []) if "storageclasses" in rule.get("resources", [])
                  for verb in rule.get("verbs", []))


def container(objects):
    return one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def env(objects):
    return {item["name"]: item.get("value") for item in container(objects)["env"]}


def restricted(objects, name):
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    security = pod.get("securityContext", {})
    check(security.get("runAsNonRoot") is True, f"{name}: pod runAsNonRoot")
    check(security.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{name}: seccomp RuntimeDefault")
    for item in pod["containers"]:
        context = item.get("securityContext", {})
        check(context.get("allowPrivilegeEscalation") is False, f"{name}: allowPrivilegeEscalation")
        check(context.get("capabilities", {}).get("drop") == ["ALL"], f"{name}: capabilities drop ALL")
        check(context.get("readOnlyRootFilesystem") is True, f"{name}: read-only root file system")
        check("resources" in item and item["resources"].get("limits"), f"{name}: resource limits")


always = ["ClusterRole", "ClusterRoleBinding", "Deployment", "Role", "RoleBinding", "Service"]

default = load("default")
check(kinds(default) == sorted(always + ["CustomResourceDefinition", "NetworkPolicy", "PodDisruptionBudget",
                                         "ServiceAccount"]), f"default kinds: {kinds(default)}")
check(not secret_rules(one(default, "ClusterRole")), "default: the ClusterRole grants Secrets")
check(not watches_pods(one(default, "ClusterRole")), "default: the ClusterRole watches pods everywhere")
check("--tenant-namespaces=" in container(default)["args"], "default: operator not limited to tenant namespaces")
check(env(default)["SECUREMAIL_LEADER_ELECTION"] == "true", "default: two replicas without leader election")
crd = one(default, "CustomResourceDefinition")
check(crd["metadata"].get("annotations", {}).get("helm.sh/resource-policy") == "keep", "default: CRD not kept")
check(crd["spec"] == yaml.safe_load((chart / "files/crds/securemailtenants.securemail.io.yaml").read_text())["spec"],
      "default: the CRD differs from the generated one")
restricted(default, "default")
check(storage_class_verbs(one(default, "ClusterRole")) == ["list", "watch"],
      "default: StorageClasses (QueueStorageEncrypted) must be readable through a watch and nothing more")

scoped = load("tenant-namespaces")
roles = {ns: doc for (kind, name, ns), doc in scoped.items() if kind == "Role" and name.endswith("-secrets")}
check(sorted(roles) == ["smchart-tenant-a", "smchart-tenant-b"], f"tenant-namespaces: Secret Roles in {sorted(roles)}")
check(all(secret_rules(role) for role in roles.values()), "tenant-namespaces: a Role without the Secret rule")
check(all(watches_pods(role) for role in roles.values()), "tenant-namespaces: a Role cannot watch the MTA pods")
check(not secret_rules(one(scoped, "ClusterRole")), "tenant-namespaces: the ClusterRole grants Secrets")
check("--tenant-namespaces=smchart-tenant-a,smchart-tenant-b" in container(scoped)["args"],
      f"tenant-namespaces: args {container(scoped)['args']}")

wide = load("cluster-wide-secrets")
check(secret_rules(one(wide, "ClusterRole")), "cluster-wide-secrets: the ClusterRole lacks Secrets")
check(watches_pods(one(wide, "ClusterRole")), "cluster-wide-secrets: the ClusterRole cannot watch the MTA pods")
check(not any(a.startswith("--tenant-namespaces") for a in container(wide)["args"]), "cluster-wide: namespaces given")
check(not [name for kind, name, _ in wide if kind == "Role" and name.endswith("-secrets")], "cluster-wide: Roles")
check(one(wide, "PodMonitor")["spec"]["namespaceSelector"] == {"any": True}, "cluster-wide: PodMonitor namespaces")

monitoring = load("monitoring")
for kind in ["ServiceMonitor", "PodMonitor", "PrometheusRule"]:
    check(kind in kinds(monitoring), f"monitoring: no {kind}")
    check(kind not in kinds(default), f"default: {kind} without its toggle")
# The alert pack with its runbook links moved from the default docsUrl to the values file's.
shipped = yaml.safe_load((chart / "files/alerts/securemail.rules.yaml").read_text())
docs_url = values["prometheusRule"]["docsUrl"]
home = yaml.safe_load((chart / "Chart.yaml").read_text())["home"]
check(docs_url.startswith(home + "/"), f"the default docsUrl {docs_url} is not the project's ({home})")
mirror = yaml.safe_load((chart.parent / "tests/values/monitoring.yaml").read_text())["prometheusRule"]["docsUrl"]
mirror = mirror.rstrip("/")
for rule in (rule for group in shipped["groups"] for rule in group["rules"]):
    link = rule["annotations"]["runbook_url"]
    check(link.startswith(docs_url + "/"), f"{rule['alert']}: runbook_url {link} is not under {docs_url}")
    rule["annotations"]["runbook_url"] = mirror + link[len(docs_url):]
rules = one(monitoring, "PrometheusRule")["spec"]
check(rules == shipped, "monitoring: the PrometheusRule differs from the alert pack with the docsUrl of its values")
dashboards = [doc for (kind, _, ns), doc in monitoring.items() if kind == "ConfigMap"]
check(len(dashboards) == 1 and dashboards[0]["metadata"]["namespace"] == "smchart-monitoring"
      and dashboards[0]["metadata"]["labels"].get("grafana_dashboard") == "1", "monitoring: dashboard ConfigMap")
for name, text in (dashboards[0]["data"] if dashboards else {}).items():
    check(json.loads(text) == json.loads((chart / "files/dashboards" / name).read_text()), f"dashboard {name} differs")
pod_monitor = one(monitoring, "PodMonitor")["spec"]
check(pod_monitor["selector"]["matchLabels"].get("app.kubernetes.io/component") == "mta", "PodMonitor selector")
check(pod_monitor["namespaceSelector"] == {"matchNames": ["smchart-tenant-a"]},
      f"monitoring: the PodMonitor watches {pod_monitor['namespaceSelector']}, not the tenant namespaces")

single = load("single-replica")
check("PodDisruptionBudget" not in kinds(single), "single-replica: a PDB would block node drains")
check(env(single)["SECUREMAIL_LEADER_ELECTION"] == "false", "single-replica: leader election on")
check("helm.sh/resource-policy" not in one(single, "CustomResourceDefinition")["metadata"].get("annotations", {}),
      "single-replica: crds.keep false still keeps the CRD")

own = load("bring-your-own")
check(kinds(own) == ["Deployment", "Service"], f"bring-your-own kinds: {kinds(own)}")
check(one(own, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "securemail-operator-existing",
      "bring-your-own: ServiceAccount name")

settings = load("settings")
item = container(settings)
check(item["image"] == "registry.example.test/securemail/operator:0.1.0-hotfix", f"settings: image {item['image']}")
check(env(settings)["SECUREMAIL_DNSBL_NAMESERVER"] == "10.0.0.53:53", "settings: DNSBL nameserver")
check(env(settings)["SECUREMAIL_SIDECAR_NAMESERVERS"] == "10.0.0.53:53,[fd00::53]:53", "settings: sidecar resolvers")
anchors_file = env(settings)["SECUREMAIL_SIDECAR_TRUST_ANCHORS_FILE"]
anchors_mount = next(mount for mount in item["volumeMounts"] if anchors_file.startswith(mount["mountPath"] + "/"))
anchors_volume = next(volume for volume in one(settings, "Deployment")["spec"]["template"]["spec"]["volumes"]
                      if volume["name"] == anchors_mount["name"])
anchors_map = one(settings, "ConfigMap", anchors_volume["configMap"]["name"])
check("IN DS 20326" in anchors_map["data"][anchors_file.rsplit("/", 1)[1]], "settings: sidecar trust anchors mounted")
check("SECUREMAIL_SIDECAR_NAMESERVERS" not in env(load("default")), "default: sidecars use their resolv.conf")
check(env(settings)["SECUREMAIL_MTA_IMAGE"] == "registry.example.test/securemail/mta-postfix:0.1.0", "settings: MTA")
check("--admin-address=0.0.0.0:9443" in item["args"], "settings: metrics port")
restricted(settings, "settings")

if failures:
    print("\n".join(f"check-rendered: {failure}" for failure in failures), file=sys.stderr)
    sys.exit(1)
print(f"check-rendered: {len(list(rendered.glob('*.yaml')))} renderings as expected")
