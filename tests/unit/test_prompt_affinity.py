"""The prompt cache key of a step and the endpoint its prefix goes to (rendezvous hashing)."""

from __future__ import annotations

from collections import Counter

from service.llm.affinity import prompt_cache_key, rendezvous


def test_the_key_names_the_kind_step_and_prompt_version_and_changes_with_any_of_them() -> None:
    key = prompt_cache_key("classify", "label", "v1")
    assert key == prompt_cache_key("classify", "label", "v1")  # stable: every worker sends the same
    others = {prompt_cache_key("classify", "label", "v2"), prompt_cache_key("review", "label", "v1"),
              prompt_cache_key("classify", "summary", "v1")}
    assert key not in others and len(others) == 3
    assert key.startswith("classify:label@v1")


def test_a_long_key_is_cut_to_64_characters_and_stays_distinct() -> None:
    a = prompt_cache_key("k" * 70, "step", "v1")
    b = prompt_cache_key("k" * 70, "step", "v2")
    assert len(a) <= 64 and len(b) <= 64 and a != b


def test_the_order_is_stable_and_a_permutation_of_the_endpoints() -> None:
    names = ["primary", "replica-1", "replica-2"]
    for i in range(50):
        order = rendezvous(names, f"kind-{i}:s@v1")
        assert sorted(order) == sorted(names)
        assert order == rendezvous(list(reversed(names)), f"kind-{i}:s@v1")  # not the list's order


def test_keys_spread_over_the_endpoints() -> None:
    names = ["primary", "replica-1", "replica-2"]
    firsts = Counter(rendezvous(names, f"kind-{i}:s@v1")[0] for i in range(600))
    assert set(firsts) == set(names)
    assert min(firsts.values()) > 120  # each about a third


def test_removing_an_endpoint_moves_only_its_share() -> None:
    names = ["primary", "replica-1", "replica-2", "replica-3"]
    keys = [f"kind-{i}:s@v1" for i in range(400)]
    before = {k: rendezvous(names, k)[0] for k in keys}
    after = {k: rendezvous([n for n in names if n != "replica-2"], k)[0] for k in keys}
    for k in keys:
        if before[k] != "replica-2":
            assert after[k] == before[k]  # the others keep their keys
        else:
            assert after[k] == rendezvous(names, k)[1]  # the next in the key's own order
    assert sum(1 for k in keys if before[k] == "replica-2") > 50
