"""Tenants at the edge: a bounded, safe label from the field or the header, or the record is poison;
and the settings that give tenants their weights, budgets and prices."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from service.agents.tasks import DEFAULT_TENANT, decode_task, fingerprint
from service.core.errors import PoisonError
from service.core.settings import Settings, TenancySettings, to_env

LIMIT = 262_144
INPUT = {"text": "x", "labels": ["a", "b"]}


def value(**body: object) -> bytes:
    return json.dumps(body).encode()


def test_a_task_names_its_tenant_in_the_field_or_the_header() -> None:
    none = decode_task(value(kind="classify", input=INPUT), [], LIMIT)
    assert none.tenant == DEFAULT_TENANT == "default"
    field = decode_task(value(kind="classify", input=INPUT, tenant="acme"), [], LIMIT)
    assert field.tenant == "acme"
    hdr = decode_task(value(kind="classify", input=INPUT), [("tenant", b"acme")], LIMIT)
    assert hdr.tenant == "acme" and hdr.fingerprint == field.fingerprint and hdr.key == field.key
    both = decode_task(value(kind="classify", input=INPUT, tenant="acme"), [("tenant", b"acme")], LIMIT)
    assert both.tenant == "acme"


def test_a_named_tenant_is_part_of_the_work_and_default_is_none() -> None:
    none = decode_task(value(kind="classify", input=INPUT), [], LIMIT)
    default = decode_task(value(kind="classify", input=INPUT, tenant="default"), [], LIMIT)
    acme = decode_task(value(kind="classify", input=INPUT, tenant="acme"), [], LIMIT)
    beta = decode_task(value(kind="classify", input=INPUT, tenant="beta"), [], LIMIT)
    # tasks without a tenant keep the fingerprint they always had
    assert none.fingerprint == default.fingerprint == fingerprint("classify", INPUT)
    assert len({none.key, acme.key, beta.key}) == 3  # no result is shared across tenants
    same_id = decode_task(value(task_id="t-1", kind="classify", input=INPUT, tenant="beta"), [], LIMIT)
    other = decode_task(value(task_id="t-1", kind="classify", input=INPUT, tenant="acme"), [], LIMIT)
    assert same_id.fingerprint != other.fingerprint  # one task id under two tenants is a conflict


@pytest.mark.parametrize("tenant", [
    "", "a" * 65, "x" * 200_000, "acme\n", "ac\x00me", "ac me", "{acme}", "acme:1", "-acme", "ä",
    "\ud800", "ac\u202eme", 17, "acme\t", ["acme"],
])
def test_a_hostile_tenant_in_the_field_is_the_records_fault(tenant: object) -> None:
    raw = json.dumps({"kind": "classify", "input": INPUT, "tenant": tenant})
    with pytest.raises(PoisonError) as err:
        decode_task(raw.encode("utf-8", "surrogatepass") if isinstance(tenant, str) else raw.encode(), [], LIMIT)
    assert err.value.reason in ("schema", "decode")
    assert len(str(err.value)) < 600  # the error never echoes a huge value


def test_a_lone_surrogate_escape_as_tenant_is_refused() -> None:
    raw = b'{"kind": "classify", "input": {"text": "x", "labels": ["a"]}, "tenant": "\\ud800"}'
    with pytest.raises(PoisonError) as err:
        decode_task(raw, [], LIMIT)
    assert err.value.reason == "schema"


@pytest.mark.parametrize("header", [
    b"", b"a" * 65, b"x" * 5_000_000, b"\xff\xfe", b"ac\x00me", b"acme\r\n", b"\xed\xa0\x80", b"{x}",
])
def test_a_hostile_tenant_header_is_the_records_fault(header: bytes) -> None:
    with pytest.raises(PoisonError) as err:
        decode_task(value(kind="classify", input=INPUT), [("tenant", header)], LIMIT)
    assert err.value.reason == "schema"
    assert len(str(err.value)) < 600


def test_field_and_header_that_disagree_or_repeat_are_refused() -> None:
    with pytest.raises(PoisonError, match="different tenants"):
        decode_task(value(kind="classify", input=INPUT, tenant="acme"), [("tenant", b"beta")], LIMIT)
    with pytest.raises(PoisonError, match="more than once"):
        decode_task(value(kind="classify", input=INPUT), [("tenant", b"acme"), ("tenant", b"beta")], LIMIT)


def test_tenancy_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_TENANCY__TENANTS", '{"Acme": {"weight": 3, "budget_tokens": 1000}, "beta": {}}')
    monkeypatch.setenv("AGENT_TENANCY__DEFAULT_WEIGHT", "0.5")
    monkeypatch.setenv("AGENT_TENANCY__DEFAULT_BUDGET_TOKENS", "100")
    monkeypatch.setenv("AGENT_TENANCY__OVER_BUDGET", "dead_letter")
    monkeypatch.setenv("AGENT_TENANCY__PRICES", '{"gpt-4o-mini": {"prompt": 0.00015, "completion": 0.0006}}')
    s = Settings()
    t = s.tenancy
    assert t.tenants["Acme"].weight == 3 and t.tenants["Acme"].budget_tokens == 1000  # names keep their case
    assert t.tenants["beta"].weight == 1 and t.tenants["beta"].budget_tokens is None
    assert t.default_weight == 0.5 and t.over_budget == "dead_letter" and t.budget_period_s == 86_400
    assert t.prices["gpt-4o-mini"].completion == 0.0006
    env = to_env(s)  # a spawned worker rebuilds the same table
    assert json.loads(env["AGENT_TENANCY__TENANTS"])["Acme"] == {"weight": 3.0, "budget_tokens": 1000}
    for key in list(env):
        monkeypatch.setenv(key, env[key])
    assert Settings().tenancy == t


@pytest.mark.parametrize("bad", [
    {"tenants": {"other": {}}},  # the label of every tenant not named
    {"tenants": {"a b": {}}},
    {"tenants": {"x" * 65: {}}},
    {"tenants": {f"t{i}": {} for i in range(101)}},  # each is a metric label
    {"tenants": {"acme": {"weight": 0}}},
    {"tenants": {"acme": {"weight": 3, "budget": 5}}},  # a typo is refused, not ignored
    {"default_weight": -1},
    {"over_budget": "drop"},
    {"budget_period_s": 0},
    {"prices": {"m": {"prompt": -1, "completion": 0}}},
    {"prices": {"m": {"prompt": 1}}},
])
def test_tenancy_settings_refuse_what_cannot_work(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        TenancySettings.model_validate(bad)


def test_labels_stay_bounded_and_unknown_tenants_get_the_defaults() -> None:
    from service.llm.tenancy import Tenancy

    t = Tenancy(TenancySettings.model_validate({
        "tenants": {"acme": {"weight": 3, "budget_tokens": 500}, "beta": {}},
        "default_weight": 0.5, "default_budget_tokens": 100,
        "prices": {"gpt-x": {"prompt": 0.5, "completion": 2.0}},
    }))
    assert (t.weight("acme"), t.weight("beta"), t.weight("zeta"), t.weight("default")) == (3, 1, 0.5, 0.5)
    assert (t.budget("acme"), t.budget("beta"), t.budget("zeta")) == (500, 100, 100)
    assert {t.label(x) for x in ("acme", "beta", "default", "zeta", "x" * 64, "other")} == {
        "acme", "beta", "default", "other"}
    assert set(t.labels()) == {"acme", "beta", "default", "other"}
    assert t.cost("gpt-x", 1000, 500) == 0.5 + 1.0  # per 1,000 prompt and completion tokens
    assert t.cost("unpriced", 1000, 500) is None and t.cost(None, 1, 1) is None


def test_a_task_of_no_tenant_or_of_a_tenant_not_named_spends_the_default_tenants_budget() -> None:
    from service.llm.tenancy import Tenancy

    t = Tenancy(TenancySettings.model_validate({
        "tenants": {"acme": {"budget_tokens": 500}, "default": {"budget_tokens": 200}, "free": {"budget_tokens": 0}},
    }))
    # (whose budget is spent, how large it is)
    assert t.account("acme") == ("acme", 500)
    assert t.account("default") == ("default", 200)
    assert t.account("zeta") == ("default", 200)  # not named: the default tenant's budget, shared
    assert t.account("") == ("default", 200)  # names none
    assert t.account("free") == ("free", 0)  # named with budget 0: no budget, by the operator's choice
    assert t.budget("zeta") == 200
    # a budget for every tenant not named: each its own, as before
    own = Tenancy(TenancySettings.model_validate({"tenants": {"acme": {"budget_tokens": 500}},
                                                  "default_budget_tokens": 100}))
    assert own.account("zeta") == ("zeta", 100) and own.account("") == ("default", 100)
    # no budget anywhere: none for anyone
    assert Tenancy(TenancySettings()).account("zeta") == ("zeta", 0)


def test_budgets_for_some_tenants_and_none_for_the_others_is_refused_at_start() -> None:
    with pytest.raises(ValidationError, match="default_budget_tokens"):
        TenancySettings.model_validate({"tenants": {"acme": {"budget_tokens": 500}}})
    # an explicit choice passes: the default tenant's budget, a budget for each, or none for default
    for ok in ({"tenants": {"acme": {"budget_tokens": 500}, "default": {"budget_tokens": 100}}},
               {"tenants": {"acme": {"budget_tokens": 500}}, "default_budget_tokens": 100},
               {"tenants": {"acme": {"budget_tokens": 500}, "default": {"budget_tokens": 0}}},
               {"tenants": {"acme": {"weight": 2}}}):
        TenancySettings.model_validate(ok)
