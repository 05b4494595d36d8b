"""Maglev table: balance, weights, disruption, determinism, changed slots."""

from __future__ import annotations

import subprocess
import sys

import pytest

from halb.lb.maglev import EMPTY, build_table, changed_slots, is_prime

pytestmark = pytest.mark.unit


def next_prime_above(n: int) -> int:
    n += 1
    while not is_prime(n):
        n += 1
    return n


def names(n: int) -> list[str]:
    return [f"10.{i // 62500}.{i // 250 % 250}.{i % 250 + 1}:80" for i in range(n)]


@pytest.mark.parametrize("n", [2, 3, 10, 100, 333, 1000])
def test_equal_weights_within_one_percent(n: int) -> None:
    size = next_prime_above(100 * n)
    table = build_table(dict.fromkeys(names(n), 1), size)
    counts = table.counts()
    assert len(counts) == n
    assert sum(counts.values()) == size
    assert EMPTY not in table.slots
    ideal = size / n
    worst = max(abs(c - ideal) / ideal for c in counts.values())
    assert worst <= 0.01, f"worst deviation {worst:.4%}"


@pytest.mark.parametrize("n", [3, 10, 100])
def test_weights_are_respected_proportionally(n: int) -> None:
    weights = {name: 1 + i % 3 for i, name in enumerate(names(n))}
    size = next_prime_above(100 * sum(weights.values()))
    counts = build_table(weights, size).counts()
    total = sum(weights.values())
    for name, weight in weights.items():
        ideal = size * weight / total
        assert abs(counts[name] - ideal) / ideal <= 0.01, (name, counts[name], ideal)


def test_zero_weight_gets_nothing_and_empty_set_gives_empty_table() -> None:
    counts = build_table({"a:1": 1, "b:1": 0, "c:1": 2}, 307).counts()
    assert counts["b:1"] == 0
    assert counts["a:1"] + counts["c:1"] == 307
    empty = build_table({"a:1": 0}, 7)
    assert list(empty.slots) == [EMPTY] * 7


@pytest.mark.parametrize("n", [3, 10, 100, 1000])
def test_removing_a_backend_disrupts_little(n: int) -> None:
    # The default ring (65537), or the smallest prime > 100 N where that is larger: with
    # M barely above 100 N a 10-backend ring moves up to ~4%, which is why the default
    # is large.
    size = max(65537, next_prime_above(100 * n))
    all_names = names(n)
    old = build_table(dict.fromkeys(all_names, 1), size).mapped(str)
    worst = 0.0
    for gone in all_names[:: max(1, n // 5)]:
        new = build_table(dict.fromkeys([x for x in all_names if x != gone], 1), size)
        moved = changed_slots(old, new.mapped(str))
        removed_slots = {i for i, name in enumerate(old) if name == gone}
        assert removed_slots <= {i for i, _ in moved}
        worst = max(worst, (len(moved) - len(removed_slots)) / size)
    print(f"\nmaglev N={n} M={size}: removing one backend moved at most {worst:.3%} other slots")
    assert worst <= 0.02


def test_adding_a_backend_takes_about_its_share() -> None:
    size = 65537
    base = build_table(dict.fromkeys(names(9), 1), size).mapped(str)
    grown = build_table(dict.fromkeys(names(10), 1), size).mapped(str)
    moved = changed_slots(base, grown)
    newcomer = names(10)[9]
    assert sum(1 for _, v in moved if v == newcomer) == grown.count(newcomer)
    assert len(moved) <= grown.count(newcomer) + 0.02 * size


def test_order_of_input_does_not_matter() -> None:
    forward = dict.fromkeys(names(50), 1)
    backward = dict(reversed(list(forward.items())))
    assert build_table(forward, 5003).slots == build_table(backward, 5003).slots


def test_identical_across_processes() -> None:
    """Hash seeds differ between interpreters; the table must not."""
    code = (
        "import hashlib;from halb.lb.maglev import build_table;"
        "t=build_table({f'10.0.0.{i}:80':1+i%2 for i in range(1,40)},4007);"
        "print(hashlib.sha256(t.slots.tobytes()).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code],
            check=True,
            capture_output=True,
            text=True,
            env={"PYTHONHASHSEED": seed},
        ).stdout.strip()
        for seed in ("1", "2", "random")
    }
    assert len(digests) == 1


def test_changed_slots() -> None:
    assert changed_slots([1, 2, 3], [1, 5, 3]) == [(1, 5)]
    assert changed_slots(None, [7, 8]) == [(0, 7), (1, 8)]
    assert changed_slots([1], [7, 8]) == [(0, 7), (1, 8)]
    assert changed_slots([1, 2], [1, 2]) == []


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="not prime"):
        build_table({"a:1": 1}, 100)
    with pytest.raises(ValueError, match="twice"):
        build_table([("a:1", 1), ("a:1", 2)], 7)
    with pytest.raises(ValueError, match="negative"):
        build_table({"a:1": -1}, 7)
