"""Ties the alert pack's unit tests to the chart. Reads `helm template` of the chart with its monitors and
PrometheusRule switched on, checks that the PrometheusRule is the alert pack, derives the `job` each monitor gives
its targets, and writes the unit tests into OUT_DIR with ${OPERATOR_JOB} and ${SIDECAR_JOB} replaced by those jobs
and ${DOCS_URL} by the environment's DOCS_URL (the chart's default prometheusRule.docsUrl). A test that names a job
itself is refused: the rules must select what the monitors really produce.
Usage: DOCS_URL=... from-chart.py RENDERED RULES TESTS_DIR OUT_DIR"""

import os
import re
import sys
from pathlib import Path

import yaml

rendered, rules, tests, out = (Path(arg) for arg in sys.argv[1:5])


def fail(message):
    sys.exit(f"check-alerts: {message}")


objects = [doc for doc in yaml.safe_load_all(rendered.read_text()) if doc]


def only(kind):
    found = [doc for doc in objects if doc["kind"] == kind]
    if len(found) != 1:
        fail(f"the chart rendered {len(found)} {kind} objects, expected one")
    return found[0]


def selected_service(monitor):
    if "namespaceSelector" in monitor["spec"]:
        fail(f"ServiceMonitor {monitor['metadata']['name']}: a namespaceSelector is not modelled here")
    wanted = monitor["spec"]["selector"]["matchLabels"]
    found = [doc["metadata"]["name"] for doc in objects if doc["kind"] == "Service"
             and doc["metadata"]["namespace"] == monitor["metadata"]["namespace"]
             and wanted.items() <= doc["metadata"].get("labels", {}).items()]
    if len(found) != 1:
        fail(f"ServiceMonitor {monitor['metadata']['name']} selects the Services {found}, expected one")
    return found[0]


def job(monitor, endpoints, default):
    """The job the Prometheus Operator gives the monitor's targets: its default (promcfg.go of the version pinned in
    e2e/versions.env), then the endpoint's relabelings in order. Only what can be known from the rendering is
    modelled; anything else is refused rather than guessed."""
    name = f"{monitor['kind']} {monitor['metadata']['name']}"
    if monitor["spec"].get("jobLabel"):
        fail(f"{name}: jobLabel takes the job from labels the rendering does not show")
    jobs = set()
    for endpoint in monitor["spec"][endpoints]:
        value = default
        for relabeling in endpoint.get("relabelings", []):
            if relabeling.get("targetLabel") != "job":
                continue
            if relabeling.get("action", "replace").lower() != "replace" or "sourceLabels" in relabeling \
                    or "regex" in relabeling:
                fail(f"{name}: a relabeling of job that is not a plain replacement: {relabeling}")
            value = relabeling["replacement"]
        jobs.add(value)
    if len(jobs) != 1:
        fail(f"{name}: its endpoints give different jobs {sorted(jobs)}")
    return jobs.pop()


if only("PrometheusRule")["spec"] != yaml.safe_load(rules.read_text()):
    fail(f"the chart's PrometheusRule is not {rules}")
service_monitor, pod_monitor = only("ServiceMonitor"), only("PodMonitor")
jobs = {
    "OPERATOR_JOB": job(service_monitor, "endpoints", selected_service(service_monitor)),
    "SIDECAR_JOB": job(pod_monitor, "podMetricsEndpoints",
                       f"{pod_monitor['metadata']['namespace']}/{pod_monitor['metadata']['name']}"),
}


placeholders = jobs | {"DOCS_URL": os.environ["DOCS_URL"]}


def placeholder(match):
    if match[1] not in placeholders:
        fail(f"unknown placeholder {match[0]} (known: {', '.join(placeholders)})")
    return placeholders[match[1]]


for test in sorted(tests.glob("*.yaml")):
    text = test.read_text()
    for literal in re.findall(r'\bjob="([^"]*)"|^\s*job: *(.*)$', text, re.MULTILINE):
        value = "".join(literal)
        if not value.startswith("${"):
            fail(f"{test} names the job {value!r} itself; use ${{OPERATOR_JOB}} or ${{SIDECAR_JOB}}")
    (out / test.name).write_text(re.sub(r"\$\{(\w+)\}", placeholder, text))
print(" ".join(f"{name}={value}" for name, value in jobs.items()))
