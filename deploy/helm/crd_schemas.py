"""Write kubeconform schemas for the chart's CRD kinds, from cloudcoil's models of those CRDs.

    python deploy/helm/crd_schemas.py DIR

cloudcoil-models-prometheus-operator and cloudcoil-models-keda (PyPI) are pydantic models generated
from prometheus-operator's and KEDA's CRDs. Each kind's JSON schema is written as
``<kind>-<group>-<version>.json``, the name kubeconform's ``{{ .ResourceKind }}{{ .KindSuffix }}``
looks for. The models ignore unknown fields where the CRDs' structural schemas prune them; here an
object with declared properties refuses any other, as kubeconform -strict does for built-in kinds.

``make helm-tools`` runs this in a virtual environment of its own under .tools (cloudcoil brings a
pytest plugin that has no place in the project's environment).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from cloudcoil.models.keda.v1alpha1 import ScaledObject
from cloudcoil.models.prometheus_operator.v1 import PrometheusRule, ServiceMonitor

MODELS: dict[str, Any] = {
    "servicemonitor-monitoring-v1": ServiceMonitor,
    "prometheusrule-monitoring-v1": PrometheusRule,
    "scaledobject-keda-v1alpha1": ScaledObject,
}


def strict(node: Any) -> Any:
    if isinstance(node, dict):
        if "properties" in node:
            node.setdefault("additionalProperties", False)
        for value in node.values():
            strict(value)
    elif isinstance(node, list):
        for value in node:
            strict(value)
    return node


def main(target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    for name, model in MODELS.items():
        schema = strict(model.model_json_schema(by_alias=True))
        (target / f"{name}.json").write_text(json.dumps(schema), encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
