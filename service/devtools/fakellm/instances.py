"""Random instances of a JSON schema, for the fake model's answers; and a value that is not one."""

from __future__ import annotations

import contextlib
import copy
import json
import random
from collections.abc import Iterable, Mapping
from typing import Any, Final
from urllib.parse import unquote

from service.devtools.fakellm.scalars import (
    VOCABULARY,
    SchemaError,
    any_value,
    count_keyword,
    integer,
    number,
    string,
    words,
)

_SIMPLE_TYPES: Final = frozenset({"string", "number", "integer", "boolean", "null", "object", "array"})
_LEAF_TYPES: Final = frozenset({"string", "number", "integer", "boolean", "null"})
_ANNOTATIONS: Final = frozenset({"title", "description", "default", "examples", "$comment"})
_SOFT_DEPTH: Final = 10  # deeper than this: only required members, fewest items, simplest branch
_HARD_DEPTH: Final = 64  # deeper than this the schema has no way out of its recursion
_MAX_DEFAULT_ITEMS: Final = 3


def random_instance(schema: Mapping[str, Any] | bool, rng: random.Random | None = None) -> Any:
    """A random JSON value that satisfies ``schema``.

    Supported: ``type`` (one or a list), ``enum``, ``const``, objects (``properties``,
    ``required``, ``additionalProperties``, ``min/maxProperties``), strings (``min/maxLength``,
    common ``format`` values; 1-6 words otherwise), numbers and integers (``minimum``,
    ``maximum``, both ``exclusive*`` forms, ``multipleOf``), booleans, null, arrays (``items``,
    ``prefixItems``, ``min/maxItems``, ``uniqueItems``), ``anyOf``/``oneOf``/``allOf``, OpenAPI's
    ``nullable`` and local ``$ref`` (``#/$defs/...``, ``#/definitions/...``). ``pattern``, ``not``
    and conditionals are not honoured.

    Raises:
        SchemaError: the schema is malformed or cannot be satisfied.
    """
    return InstanceGenerator(schema, rng if rng is not None else random.Random()).generate(schema, 0)


def _merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` and ``extra`` as one schema: properties merged, required united, rest overridden."""
    merged = dict(base)
    for key, value in extra.items():
        if key == "properties" and isinstance(merged.get(key), Mapping) and isinstance(value, Mapping):
            merged[key] = {**merged[key], **value}
        elif key == "required" and isinstance(merged.get(key), list) and isinstance(value, list):
            merged[key] = list(dict.fromkeys([*merged[key], *value]))
        else:
            merged[key] = value
    return merged


def _is_leaf(schema: Any) -> bool:
    """Whether generating ``schema`` cannot recurse (used to bottom out recursive schemas)."""
    if not isinstance(schema, Mapping):
        return True
    if "$ref" in schema or "properties" in schema or "items" in schema:
        return False
    kind = schema.get("type")
    if isinstance(kind, list):
        return any(k in _LEAF_TYPES for k in kind)
    return kind is None or kind in _LEAF_TYPES


def _fresh_key(rng: random.Random, taken: Iterable[str]) -> str:
    used = set(taken)
    key = rng.choice(VOCABULARY)
    suffix = 2
    while key in used:
        key = f"{rng.choice(VOCABULARY)}_{suffix}"
        suffix += 1
    return key


class InstanceGenerator:
    """A random instance of a schema, built top-down: references, combinations, objects, arrays;
    the scalars come from :mod:`.scalars`."""

    __slots__ = ("_rng", "_root")

    def __init__(self, root: Mapping[str, Any] | bool, rng: random.Random) -> None:
        self._root = root
        self._rng = rng

    def generate(self, schema: Any, depth: int) -> Any:
        if depth > _HARD_DEPTH:
            raise SchemaError("schema nests too deeply (a recursive $ref without a way out?)")
        if schema is True:
            return any_value(self._rng)
        if schema is False:
            raise SchemaError("the schema `false` has no instance")
        if not isinstance(schema, Mapping):
            raise SchemaError(f"a schema must be an object or a boolean, not {type(schema).__name__}")
        deep = depth >= _SOFT_DEPTH
        simpler = self._simplify(schema, deep)
        if simpler is not None:
            return self.generate(simpler, depth + 1)
        if "const" in schema:
            return copy.deepcopy(schema["const"])
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise SchemaError("enum must be a non-empty list")
            return copy.deepcopy(self._rng.choice(values))
        if schema.get("nullable") is True and (deep or self._rng.random() < 0.25):
            return None
        return self._typed(self._type(schema, deep), schema, depth, deep)

    def _typed(self, kind: str | None, schema: Mapping[str, Any], depth: int, deep: bool) -> Any:
        if kind == "object":
            return self._object(schema, depth, deep)
        if kind == "array":
            return self._array(schema, depth, deep)
        if kind == "string":
            return string(schema, self._rng)
        if kind == "integer":
            return integer(schema, self._rng)
        if kind == "number":
            return number(schema, self._rng)
        if kind == "boolean":
            return self._rng.random() < 0.5
        if kind == "null":
            return None
        return any_value(self._rng)

    def _simplify(self, schema: Mapping[str, Any], deep: bool) -> Any:
        """The schema with one ``$ref``, ``allOf`` or ``anyOf``/``oneOf`` taken out; None if none."""
        if "$ref" in schema:
            siblings = {k: v for k, v in schema.items() if k != "$ref" and k not in _ANNOTATIONS}
            target = self._resolve(schema["$ref"])
            return _merge(target, siblings) if siblings else target
        if "allOf" in schema:
            parts = schema["allOf"]
            if not isinstance(parts, list):
                raise SchemaError("allOf must be a list")
            merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
            for part in parts:
                if part is False:
                    raise SchemaError("allOf contains `false`")
                if isinstance(part, Mapping):
                    merged = _merge(merged, self._resolve(part["$ref"]) if "$ref" in part else part)
            return merged
        for keyword in ("anyOf", "oneOf"):
            if keyword in schema:
                return self._branch(schema, keyword, deep)
        return None

    # -- structure ------------------------------------------------------------------------------

    def _resolve(self, ref: Any) -> Mapping[str, Any]:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise SchemaError(f"only local JSON-pointer $ref values are supported, not {ref!r}")
        node: Any = self._root
        for raw in ref[2:].split("/") if ref != "#" else []:
            token = unquote(raw).replace("~1", "/").replace("~0", "~")
            if isinstance(node, Mapping) and token in node:
                node = node[token]
            elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
                node = node[int(token)]
            else:
                raise SchemaError(f"$ref {ref!r} points nowhere")
        if node is True:
            return {}
        if not isinstance(node, Mapping):
            raise SchemaError(f"$ref {ref!r} does not point at a schema")
        return node

    def _branch(self, schema: Mapping[str, Any], keyword: str, deep: bool) -> Any:
        """One of the ``anyOf``/``oneOf`` options, with the keywords beside it merged in."""
        options = schema[keyword]
        if not isinstance(options, list) or not options:
            raise SchemaError(f"{keyword} must be a non-empty list")
        options = [o for o in options if o is not False] or options
        if deep:
            options = [o for o in options if _is_leaf(o)] or options
        chosen = self._rng.choice(options)
        rest = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf") and k not in _ANNOTATIONS}
        if chosen is True:
            return rest
        if not rest or not isinstance(chosen, Mapping):
            return chosen
        return _merge(rest, chosen)

    def _type(self, schema: Mapping[str, Any], deep: bool) -> str | None:
        kind = schema.get("type")
        if kind is None:
            if any(k in schema for k in ("properties", "required", "additionalProperties")):
                return "object"
            if any(k in schema for k in ("items", "prefixItems", "minItems", "maxItems")):
                return "array"
            if any(k in schema for k in ("minLength", "maxLength", "format", "pattern")):
                return "string"
            if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
                return "number"
            return None
        if isinstance(kind, list):
            if not kind or not all(isinstance(k, str) and k in _SIMPLE_TYPES for k in kind):
                raise SchemaError(f"unsupported type list {kind!r}")
            if deep:
                kind = [k for k in kind if k in _LEAF_TYPES] or kind
            return str(self._rng.choice(kind))
        if not isinstance(kind, str) or kind not in _SIMPLE_TYPES:
            raise SchemaError(f"unsupported type {kind!r}")
        return kind

    def _object(self, schema: Mapping[str, Any], depth: int, deep: bool) -> dict[str, Any]:
        properties = schema.get("properties") or {}
        required = schema.get("required") or []
        if not isinstance(properties, Mapping) or not isinstance(required, list):
            raise SchemaError("properties must be an object and required a list")
        additional = schema.get("additionalProperties", True)
        low = count_keyword(schema, "minProperties") or 0
        high = count_keyword(schema, "maxProperties")
        required_names = list(dict.fromkeys(str(name) for name in required))
        if high is not None and (len(required_names) > high or low > high):
            raise SchemaError("maxProperties is smaller than minProperties or the required members")

        names = self._members(properties, required_names, low, high, deep)
        extras = 0
        if additional is not False and not properties and not deep:
            extras = self._rng.randint(1, 3) if isinstance(additional, Mapping) else self._rng.randint(0, 2)
        extras = max(extras, low - len(names))
        if high is not None:
            extras = min(extras, high - len(names))
        if extras > 0 and additional is False:
            raise SchemaError("minProperties needs more members than the schema allows")

        result: dict[str, Any] = {}
        for name in names:
            if name in properties:
                result[name] = self.generate(properties[name], depth + 1)
            else:
                result[name] = self._extra(additional, depth)
        for _ in range(extras):
            result[_fresh_key(self._rng, [*properties, *result])] = self._extra(additional, depth)
        return result

    def _members(self, properties: Mapping[str, Any], required: list[str], low: int, high: int | None,
                 deep: bool) -> list[str]:
        """The declared members to fill: every required one, some optional ones, within the bounds."""
        names = list(required)
        optional = [name for name in properties if name not in required]
        if not deep:
            names += [name for name in optional if self._rng.random() < 0.5]
        for name in optional:
            if len(names) >= low:
                break
            if name not in names:
                names.append(name)
        if high is not None:
            dropped = [name for name in names if name not in required][: max(0, len(names) - high)]
            names = [name for name in names if name not in dropped]
        return names

    def _extra(self, additional: Any, depth: int) -> Any:
        if isinstance(additional, Mapping):
            return self.generate(additional, depth + 1)
        return words(self._rng)

    def _array(self, schema: Mapping[str, Any], depth: int, deep: bool) -> list[Any]:
        rng = self._rng
        items: Any = schema.get("items", True)
        prefix: Any = schema.get("prefixItems", [])
        if isinstance(items, list):  # draft 4 tuple form
            prefix, items = items, schema.get("additionalItems", True)
        if not isinstance(prefix, list):
            raise SchemaError("prefixItems must be a list")
        low = count_keyword(schema, "minItems") or 0
        high = count_keyword(schema, "maxItems")
        if items is False:
            high = len(prefix) if high is None else min(high, len(prefix))
        if high is not None and low > high:
            raise SchemaError("minItems is larger than maxItems")
        if deep:
            size = low
        else:
            upper = max(low, _MAX_DEFAULT_ITEMS)
            size = rng.randint(low, upper if high is None else min(upper, high))
        unique = schema.get("uniqueItems") is True
        result: list[Any] = []
        seen: set[str] = set()
        for index in range(size):
            item_schema = prefix[index] if index < len(prefix) else items
            value = self.generate(item_schema, depth + 1)
            if unique:
                fingerprint = json.dumps(value, sort_keys=True)
                for _ in range(32):
                    if fingerprint not in seen:
                        break
                    value = self.generate(item_schema, depth + 1)
                    fingerprint = json.dumps(value, sort_keys=True)
                else:
                    if len(result) >= low:
                        break
                    raise SchemaError("cannot find enough distinct items for uniqueItems")
                seen.add(fingerprint)
            result.append(value)
        return result


def violation(schema: Mapping[str, Any] | None) -> str:
    """Valid JSON that does not satisfy ``schema``."""
    root: Any = schema
    if isinstance(root, Mapping) and isinstance(root.get("$ref"), str):
        with contextlib.suppress(SchemaError):
            root = InstanceGenerator(schema or {}, random.Random(0))._resolve(root["$ref"])
    if isinstance(root, Mapping):
        is_object = root.get("type") == "object" or "properties" in root
        permissive = not root.get("required") and root.get("additionalProperties", True) is not False
        if is_object and permissive:
            return '[{"unexpected":true}]'
    return '{"unexpected":true}'
