#!/usr/bin/env python3
"""Checks the Grafana dashboard the chart ships against docs/metrics.md.

Every metric name in every panel query and template-variable query must be one docs/metrics.md lists (a histogram's
`_bucket`, `_sum` and `_count` series included), and every label a query selects or groups by must be one of those
metrics' documented labels: a misspelt name or label does not break a dashboard, it silently shows "No data". Also
refused: duplicate panel ids, panels without queries, any data source but the `${datasource}` template variable
(a fixed data source uid breaks the dashboard in every other Grafana), a fixed dashboard id.

With PROMTOOL naming a promtool binary, every expression (template variables replaced by literals) also goes through
`promtool check rules` as a recording rule: promtool has no command that parses a bare expression, and its rule check
runs the real PromQL parser, types included (e.g. rate() of an instant vector).

Usage: check-dashboard.py [DASHBOARD_JSON] [--docs METRICS_MD]   (exit 1 on any problem)
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DASHBOARD = REPO / "charts/securemail-operator/files/dashboards/securemail-overview.json"
DEFAULT_DOCS = REPO / "docs/metrics.md"
DATASOURCE_REFS = {"${datasource}", "$datasource"}
# Labels Prometheus (or the Prometheus Operator's ServiceMonitor/PodMonitor) attaches at scrape time.
TARGET_LABELS = {"job", "instance", "namespace", "pod", "container", "service", "endpoint"}

AGGREGATORS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "limitk", "limit_ratio",
}
FUNCTIONS = {
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh", "avg_over_time",
    "ceil", "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh", "count_over_time", "day_of_month",
    "day_of_week", "day_of_year", "days_in_month", "deg", "delta", "deriv", "double_exponential_smoothing", "end",
    "exp", "first_over_time", "floor", "histogram_avg", "histogram_count", "histogram_fraction",
    "histogram_quantile", "histogram_stddev", "histogram_stdvar", "histogram_sum", "holt_winters", "hour", "idelta",
    "increase", "info", "irate", "label_join", "label_replace", "last_over_time", "ln", "log10", "log2",
    "mad_over_time", "max_over_time", "min_over_time", "minute", "month", "pi", "predict_linear",
    "present_over_time", "quantile_over_time", "rad", "rate", "resets", "round", "scalar", "sgn", "sin", "sinh",
    "sort", "sort_by_label", "sort_by_label_desc", "sort_desc", "sqrt", "start", "stddev_over_time",
    "stdvar_over_time", "sum_over_time", "tan", "tanh", "time", "timestamp", "ts_of_first_over_time",
    "ts_of_last_over_time", "ts_of_max_over_time", "ts_of_min_over_time", "vector", "year",
}
# Followed by a parenthesised list of label names, not by an expression.
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = GROUPING | {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}

IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
LABEL = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Numbers and durations (0.95, 1e-3, 0x1f, 5m, 1h30m): never names.
NUMBER = re.compile(r"(?:[0-9]*\.)?[0-9]+(?:[eE][+-]?[0-9]+)?[A-Za-z0-9_]*")
VARIABLE = re.compile(r"\$\{[^}]*\}|\$[A-Za-z0-9_]+")
MATCH_OP = re.compile(r"=~|!~|!=|=")


class PromQLError(ValueError):
    pass


@dataclass
class Refs:
    """What one expression reads: metric names, labels selected on each metric, labels grouped or matched on."""

    metrics: list[str] = field(default_factory=list)
    selected: list[tuple[str, str]] = field(default_factory=list)  # (metric, label)
    grouping: list[str] = field(default_factory=list)


def skip_string(expr: str, i: int) -> int:
    """Index just past the string literal starting at expr[i]."""
    quote = expr[i]
    i += 1
    while i < len(expr):
        if expr[i] == "\\" and quote != "`":
            i += 2
            continue
        if expr[i] == quote:
            return i + 1
        i += 1
    raise PromQLError(f"unterminated string starting {expr[i - 1:][:20]!r}")


def skip_space(expr: str, i: int) -> int:
    while i < len(expr) and (expr[i].isspace() or expr[i] == "#"):
        if expr[i] == "#":  # comment to the end of the line
            while i < len(expr) and expr[i] != "\n":
                i += 1
        else:
            i += 1
    return i


def read_matchers(expr: str, i: int, metric: str | None, refs: Refs) -> int:
    """Reads `{...}` starting at expr[i], the matchers of `metric` (None for a bare selector): records the labels it
    selects on, and a `__name__` or quoted name as a metric."""
    i += 1
    named: list[str] = []
    labels: list[str] = []
    while True:
        i = skip_space(expr, i)
        if i >= len(expr):
            raise PromQLError("unterminated {")
        if expr[i] == "}":
            i += 1
            break
        if expr[i] == ",":
            i += 1
            continue
        if expr[i] in "\"'`":
            end = skip_string(expr, i)
            token = expr[i + 1:end - 1]
            i = skip_space(expr, end)
            if not MATCH_OP.match(expr, i):  # a quoted metric name (UTF-8 names, Prometheus 3)
                named.append(token)
                continue
            label = token
        else:
            match = LABEL.match(expr, i)
            if not match:
                raise PromQLError(f"unexpected {expr[i:][:20]!r} in label matchers")
            label = match.group()
            i = skip_space(expr, match.end())
        op = MATCH_OP.match(expr, i)
        if not op:
            raise PromQLError(f"no matcher operator after label {label!r}")
        i = skip_space(expr, op.end())
        if i >= len(expr) or expr[i] not in "\"'`":
            raise PromQLError(f"label {label!r} is not matched against a string")
        end = skip_string(expr, i)
        if label == "__name__":
            if op.group() != "=":
                raise PromQLError("__name__ matched by regex or negation: its metrics cannot be checked")
            named.append(expr[i + 1:end - 1])
        else:
            labels.append(label)
        i = end
    names = ([metric] if metric else []) + named
    if not names:
        raise PromQLError("a selector without a metric name cannot be checked")
    refs.metrics.extend(named)
    refs.selected.extend((name, label) for name in names for label in labels)
    return i


def read_label_list(expr: str, i: int, refs: Refs) -> int:
    """Reads the `(a, b)` after by/without/on/ignoring/group_left/group_right."""
    end = expr.find(")", i)
    if end < 0:
        raise PromQLError("unterminated label list")
    for item in expr[i + 1:end].split(","):
        item = item.strip().strip("\"'`")
        if item:
            if not LABEL.fullmatch(item):
                raise PromQLError(f"{item!r} is not a label name")
            refs.grouping.append(item)
    return end + 1


def references(expr: str) -> Refs:
    """Metric and label names an expression reads. Functions, keywords, strings, numbers, durations, ranges and
    Grafana variables are skipped; an unknown function is an error (a typo would otherwise pass as a metric)."""
    refs = Refs()
    i, depth = 0, 0
    while True:
        i = skip_space(expr, i)
        if i >= len(expr):
            break
        char = expr[i]
        if char in "\"'`":
            i = skip_string(expr, i)
        elif char == "{":
            i = read_matchers(expr, i, None, refs)
        elif char == "[":  # range or subquery: durations and $__rate_interval
            end = expr.find("]", i)
            if end < 0:
                raise PromQLError("unterminated [")
            i = end + 1
        elif char == "$":
            match = VARIABLE.match(expr, i)
            if not match:
                raise PromQLError(f"stray $ at {expr[i:][:20]!r}")
            i = match.end()
        elif char.isdigit() or (char == "." and expr[i + 1:i + 2].isdigit()):
            i = NUMBER.match(expr, i).end()
        elif IDENT.match(expr, i):
            match = IDENT.match(expr, i)
            name, lower = match.group(), match.group().lower()
            after = skip_space(expr, match.end())
            if after < len(expr) and expr[after] == "(":
                if lower in GROUPING:
                    i = read_label_list(expr, after, refs)
                    continue
                if name not in FUNCTIONS and name not in AGGREGATORS:
                    raise PromQLError(f"unknown function {name}()")
                i = match.end()
            elif lower in KEYWORDS:
                i = match.end()
            elif name in AGGREGATORS and re.match(r"(?i)(by|without)\s*\(", expr[after:]):
                i = match.end()  # `sum by (label) (expr)`
            else:
                refs.metrics.append(name)
                i = match.end()
                if after < len(expr) and expr[after] == "{":
                    i = read_matchers(expr, after, name, refs)
        else:
            depth += {"(": 1, ")": -1}.get(char, 0)
            if depth < 0:
                raise PromQLError("unbalanced )")
            i += 1
    if depth:
        raise PromQLError("unbalanced (")
    return refs


def documented_metrics(docs: Path) -> dict[str, set[str]]:
    """Metric name -> label names, from the tables of docs/metrics.md (first column a `name`, second its type).
    A table header like "Labels (besides tenant, source_ip)" adds those labels to every row of that table."""
    metrics: dict[str, set[str]] = {}
    common: set[str] = set()
    for line in docs.read_text(encoding="utf-8").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) < 3:
            continue
        if cells[0] == "Metric":
            besides = re.search(r"besides ([^)]*)", cells[2])
            common = {label.strip(" `") for label in besides.group(1).split(",")} if besides else set()
            continue
        name = re.fullmatch(r"`([A-Za-z_:][A-Za-z0-9_:]*)`", cells[0])
        if not name:
            continue
        labels = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", cells[2])) | common
        metrics[name.group(1)] = labels
        if cells[1] == "histogram":
            metrics[name.group(1) + "_bucket"] = labels | {"le"}
            metrics[name.group(1) + "_sum"] = labels
            metrics[name.group(1) + "_count"] = labels
    if not metrics:
        raise SystemExit(f"check-dashboard: no metric table found in {docs}")
    return metrics


def variable_query(variable: dict) -> tuple[str | None, str | None]:
    """The PromQL inside a query variable and the label it lists: Grafana's label_values(expr, label) and
    query_result(expr) wrap it."""
    query = variable.get("query")
    if isinstance(query, dict):
        query = query.get("query")
    query = (query or variable.get("definition") or "").strip()
    if match := re.fullmatch(r"label_values\((.*),\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)", query, re.S):
        return match.group(1), match.group(2)
    if re.fullmatch(r"label_values\(\s*[A-Za-z_][A-Za-z0-9_]*\s*\)|label_names\(\)|metrics\(.*\)", query, re.S):
        return None, None  # not tied to a metric
    if match := re.fullmatch(r"query_result\((.*)\)", query, re.S):
        return match.group(1), None
    return query or None, None


def is_variable_datasource(datasource) -> bool:
    uid = datasource.get("uid") if isinstance(datasource, dict) else datasource
    kind = datasource.get("type", "prometheus") if isinstance(datasource, dict) else "prometheus"
    return uid in DATASOURCE_REFS and kind == "prometheus"


def all_panels(panels: list[dict]):
    for panel in panels:
        yield panel
        # A collapsed row keeps its panels inside it.
        yield from all_panels(panel.get("panels") or [])


def substitute(expr: str) -> str:
    """Grafana's variables replaced by literals promtool can parse: durations for the interval ones, a plain string
    for ours (they only appear inside matcher strings)."""
    expr = re.sub(r"\$\{__(?:rate_interval|interval|range)\}|\$__(?:rate_interval|interval|range)\b", "5m", expr)
    return VARIABLE.sub("x", expr)


def check(dashboard: dict, metrics: dict[str, set[str]]) -> tuple[list[str], list[tuple[str, str]]]:
    """Problems found, and (where, expression) for promtool."""
    problems: list[str] = []
    expressions: list[tuple[str, str]] = []

    def check_expr(where: str, expr: str, listed_label: str | None = None) -> None:
        try:
            refs = references(expr)
        except PromQLError as error:
            problems.append(f"{where}: cannot read the query: {error}: {expr!r}")
            return
        if not refs.metrics:
            problems.append(f"{where}: the query reads no metric: {expr!r}")
        unknown = [metric for metric in dict.fromkeys(refs.metrics) if metric not in metrics]
        for metric in unknown:
            problems.append(f"{where}: metric {metric} is not documented in docs/metrics.md")
        for metric, label in refs.selected:
            if metric in metrics and label not in metrics[metric] | TARGET_LABELS:
                problems.append(f"{where}: {metric} has no label {label!r} (docs/metrics.md)")
        if not unknown:  # an unknown metric's labels are unknown too: its own error says enough
            known = set().union(TARGET_LABELS, *(metrics[metric] for metric in refs.metrics))
            for label in dict.fromkeys(refs.grouping + ([listed_label] if listed_label else [])):
                if label not in known:
                    problems.append(f"{where}: groups or matches on {label!r}, a label none of its metrics has")
        expressions.append((where, expr))

    if dashboard.get("id") is not None:
        problems.append("dashboard: id must be null (Grafana assigns it; a fixed id collides on import)")
    variables = dashboard.get("templating", {}).get("list", [])
    if not any(v.get("name") == "datasource" and v.get("type") == "datasource" and v.get("query") == "prometheus"
               for v in variables):
        problems.append("templating: no `datasource` variable of type datasource for Prometheus")
    for variable in variables:
        if variable.get("type") != "query":
            continue
        where = f"variable ${variable.get('name')}"
        if not is_variable_datasource(variable.get("datasource")):
            problems.append(f"{where}: data source {variable.get('datasource')!r} is not ${{datasource}}")
        query, label = variable_query(variable)
        if query:
            check_expr(where, query, label)

    ids: dict[object, str] = {}
    for panel in all_panels(dashboard.get("panels", [])):
        where = f"panel {panel.get('id')} {panel.get('title', '')!r}"
        if panel.get("id") in ids:
            problems.append(f"{where}: id {panel.get('id')} is also the id of {ids[panel.get('id')]}")
        ids.setdefault(panel.get("id"), where)
        if panel.get("type") == "row":
            continue
        if not is_variable_datasource(panel.get("datasource")):
            problems.append(f"{where}: data source {panel.get('datasource')!r} is not ${{datasource}}")
        targets = panel.get("targets") or []
        if not targets:
            problems.append(f"{where}: no targets (queries)")
        for target in targets:
            target_where = f"{where} target {target.get('refId', '?')}"
            if "datasource" in target and not is_variable_datasource(target["datasource"]):
                problems.append(f"{target_where}: data source {target['datasource']!r} is not ${{datasource}}")
            if not (target.get("expr") or "").strip():
                problems.append(f"{target_where}: empty expr")
                continue
            check_expr(target_where, target["expr"])
    return problems, expressions


def promtool_check(promtool: str, expressions: list[tuple[str, str]]) -> list[str]:
    rules, names = [], {}
    for n, (where, expr) in enumerate(expressions):
        record = f"dashboard_check:expr_{n}"
        names[record] = where
        rules.append({"record": record, "expr": substitute(expr)})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "dashboard-exprs.rules.yaml")
        # JSON is YAML: no dependency needed to write it.
        path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}, indent=1))
        result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    if result.returncode == 0:
        return []
    output = result.stdout + result.stderr
    for record, where in names.items():  # name the panel, not the generated rule
        output = re.sub(rf"\b{re.escape(record)}\b", f"{record} ({where})", output)
    return [f"promtool check rules refused an expression:\n{output.strip()}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dashboard", nargs="?", type=Path, default=DEFAULT_DASHBOARD)
    parser.add_argument("--docs", type=Path, default=DEFAULT_DOCS)
    args = parser.parse_args()
    try:
        dashboard = json.loads(args.dashboard.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        print(f"check-dashboard: cannot read {args.dashboard}: {error}", file=sys.stderr)
        return 1
    problems, expressions = check(dashboard, documented_metrics(args.docs))
    promtool = os.environ.get("PROMTOOL")
    if not promtool:
        print("check-dashboard: PROMTOOL not set, expressions not parsed by promtool", file=sys.stderr)
    elif expressions:
        problems += promtool_check(promtool, expressions)
    for problem in problems:
        print(f"check-dashboard: {args.dashboard.name}: {problem}", file=sys.stderr)
    if problems:
        return 1
    print(f"check-dashboard: {args.dashboard.name}: {len(expressions)} queries, all metrics documented"
          + (", all parsed by promtool" if promtool else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
