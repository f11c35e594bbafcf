"""Validate objects against a CustomResourceDefinition the way the API server would, closely
enough for tests, without a cluster.

The API server applies a CRD's ``default``s, checks its OpenAPI v3 schema (with the Kubernetes
extensions) and evaluates its CEL rules (``x-kubernetes-validations``). This module does the
same with ``jsonschema`` and ``celpy``:

- the schema is translated to JSON Schema draft 4 (``x-kubernetes-int-or-string`` becomes
  "integer or string", ``nullable`` adds null) and checked with the integer ranges that
  ``format: int32`` and ``int64`` imply and RFC 3339 ``date-time``;
- unknown fields are errors unless ``x-kubernetes-preserve-unknown-fields`` says otherwise. The
  server would silently prune them, which hides a typo or a field the upstream API does not
  have, so tests are stricter than the server on purpose;
- CEL rules see ``self`` typed by the schema (``number`` as double, property names escaped as
  Kubernetes does, e.g. ``namespace`` -> ``__namespace__``); transition rules (``oldSelf``) are
  skipped because there is no previous object. Kubernetes' CEL extension libraries are not
  available, so a rule that needs one fails loudly rather than passing.
"""

from __future__ import annotations

import copy
import datetime as dt
import functools
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import yaml
from celpy import celtypes

Schema = dict[str, Any]

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_documents(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document of a file (the upstream CRD files are large: use libyaml)."""
    with open(path, encoding="utf-8") as f:
        return [doc for doc in yaml.load_all(f, Loader=_LOADER) if doc]


def version_schema(crd: Mapping[str, Any], version: str | None = None) -> Schema:
    """The ``openAPIV3Schema`` of ``version``, or of the storage version."""
    for v in crd["spec"]["versions"]:
        if v["name"] == version or (version is None and v.get("storage")):
            return v["schema"]["openAPIV3Schema"]
    raise KeyError(f"{crd['metadata']['name']} has no version {version!r}")


# --- defaulting ---------------------------------------------------------------------------


def apply_defaults(schema: Schema, value: Any) -> Any:
    """A copy of ``value`` with the schema's defaults filled in, as the API server does: a
    missing property with a ``default`` gets it, then defaulting continues inside it."""
    value = copy.deepcopy(value)
    _default_in_place(schema, value)
    return value


def _default_in_place(schema: Schema, value: Any) -> None:
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                _default_in_place(sub, value[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name, item in value.items():
                if name not in schema.get("properties", {}):
                    _default_in_place(extra, item)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _default_in_place(schema["items"], item)


# --- structural schema -> JSON Schema -------------------------------------------------------

_SCHEMA_MAPS = ("properties", "patternProperties", "definitions")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf")


def to_json_schema(schema: Schema, *, strict: bool = True) -> Schema:
    """Translate a Kubernetes structural schema to JSON Schema draft 4."""
    out: Schema = {}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "description", "example"):
            continue
        if key in _SCHEMA_MAPS:
            out[key] = {k: to_json_schema(v, strict=strict) for k, v in value.items()}
        elif key in _SCHEMA_LISTS:
            out[key] = [to_json_schema(v, strict=strict) for v in value]
        elif key in ("items", "not", "additionalProperties") and isinstance(value, dict):
            out[key] = to_json_schema(value, strict=strict)
        else:
            out[key] = value
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    preserve = schema.get("x-kubernetes-preserve-unknown-fields")
    if strict and "properties" in schema and "additionalProperties" not in schema and not preserve:
        out["additionalProperties"] = False
    return out


_FORMATS = jsonschema.FormatChecker(formats=())


@_FORMATS.checks("int32")
def _int32(value: object) -> bool:
    return not isinstance(value, int) or -(2**31) <= value < 2**31


@_FORMATS.checks("int64")
def _int64(value: object) -> bool:
    return not isinstance(value, int) or -(2**63) <= value < 2**63


_RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$", re.IGNORECASE)


@_FORMATS.checks("date-time", raises=ValueError)
def _date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True
    if not _RFC3339.match(value):
        raise ValueError(f"{value!r} is not an RFC 3339 date-time")
    dt.datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    return True


# --- CEL --------------------------------------------------------------------------------------

_CEL_KEYWORDS = frozenset(
    ("true", "false", "null", "in", "as", "break", "const", "continue", "else", "for",
     "function", "if", "import", "let", "loop", "package", "namespace", "return", "var",
     "void", "while")
)  # fmt: skip
_CEL = celpy.Environment()


@functools.cache
def cel_program(rule: str) -> celpy.Runner:
    """A compiled rule (compiling is the slow part; rules repeat across objects)."""
    return _CEL.program(_CEL.compile(rule))


def escape_property(name: str) -> str:
    """A property name as CEL rules see it (the Kubernetes escaping rules)."""
    if name in _CEL_KEYWORDS:
        return f"__{name}__"
    name = name.replace("__", "__underscores__")
    for char, word in ((".", "dot"), ("-", "dash"), ("/", "slash")):
        name = name.replace(char, f"__{word}__")
    return name


def to_cel(schema: Schema, value: Any) -> Any:
    """``value`` as a CEL value typed by ``schema`` (``number`` is a double even when the YAML
    wrote ``1``, as on the API server)."""
    kind = schema.get("type")
    if schema.get("x-kubernetes-int-or-string"):
        return celtypes.IntType(value) if isinstance(value, int) else celtypes.StringType(value)
    if kind == "object" and isinstance(value, dict):
        props = schema.get("properties")
        if props is not None:
            return celtypes.MapType(
                {
                    celtypes.StringType(escape_property(k)): to_cel(props.get(k, {}), v)
                    for k, v in value.items()
                }
            )
        extra = schema.get("additionalProperties")
        sub = extra if isinstance(extra, dict) else {}
        return celtypes.MapType({celtypes.StringType(k): to_cel(sub, v) for k, v in value.items()})
    if kind == "array" and isinstance(value, list):
        return celtypes.ListType([to_cel(schema.get("items", {}), v) for v in value])
    if kind == "number" and isinstance(value, int | float) and not isinstance(value, bool):
        return celtypes.DoubleType(float(value))
    return celpy.json_to_cel(value)


def cel_errors(schema: Schema, value: Any, path: str = "") -> Iterator[str]:
    """Messages of the CEL rules ``value`` breaks, each prefixed with the field's path."""
    rules = [r for r in schema.get("x-kubernetes-validations", []) if "oldSelf" not in r["rule"]]
    if rules:
        activation = {"self": to_cel(schema, value)}
        for rule in rules:
            where = path or "<root>"
            try:
                ok = cel_program(rule["rule"]).evaluate(activation)
            except celpy.CELEvalError as error:
                yield f"{where}: rule {rule['rule']!r} could not be evaluated: {error}"
                continue
            if not isinstance(ok, celtypes.BoolType):
                yield f"{where}: rule {rule['rule']!r} gave {ok!r}, not a boolean"
            elif not ok:
                yield f"{where}: {rule.get('message') or 'failed rule: ' + rule['rule']}"
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for name, item in value.items():
            sub = props.get(name, extra if isinstance(extra, dict) else None)
            if sub is not None:
                yield from cel_errors(sub, item, f"{path}.{name}" if path else name)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from cel_errors(schema["items"], item, f"{path}[{i}]")


# --- the whole check --------------------------------------------------------------------------


def _field_path(parts: Iterator[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


class CRDValidator:
    """Defaults, schema and CEL rules of one CRD version, in the API server's order."""

    def __init__(self, crd: Mapping[str, Any], version: str | None = None) -> None:
        self.crd = crd
        self.schema = version_schema(crd, version)
        # Every object has these at its root, whether the CRD's schema declares them or not.
        root = copy.deepcopy(self.schema)
        for name, kind in (("apiVersion", "string"), ("kind", "string"), ("metadata", "object")):
            root.setdefault("properties", {}).setdefault(name, {"type": kind})
        self._json = jsonschema.Draft4Validator(to_json_schema(root), format_checker=_FORMATS)

    def defaulted(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        return apply_defaults(self.schema, obj)

    def errors(self, obj: Mapping[str, Any]) -> list[str]:
        """Every problem with ``obj`` after defaulting, as ``field.path: message``. CEL rules
        run only on a schema-valid object, like the server (they assume the schema holds)."""
        obj = self.defaulted(obj)
        found = sorted(
            f"{_field_path(iter(e.absolute_path))}: {e.message}"
            for e in self._json.iter_errors(obj)
        )
        return found or list(cel_errors(self.schema, obj))
