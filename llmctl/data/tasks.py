"""The built-in fine-tuning tasks: generated questions with checkable answers (arithmetic, sorting, reversing, counting,
simple formatting), a training split and a held-out split, both fixed by the seed."""

from __future__ import annotations

import random
from collections.abc import Callable

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _word(r: random.Random) -> str:
    return "".join(r.choice(LETTERS) for _ in range(r.randint(3, 5)))


def _add(r: random.Random) -> tuple[str, str]:
    a, b = r.randint(0, 49), r.randint(0, 49)
    return f"What is {a} plus {b}?", str(a + b)


def _sort(r: random.Random) -> tuple[str, str]:
    digits = [r.randint(0, 9) for _ in range(r.randint(3, 4))]
    return f"Sort these digits: {' '.join(map(str, digits))}", " ".join(map(str, sorted(digits)))


def _reverse(r: random.Random) -> tuple[str, str]:
    word = _word(r)
    return f"Reverse the word {word}.", word[::-1]


def _count(r: random.Random) -> tuple[str, str]:
    word = _word(r)
    return f"How many letters are in {word}?", str(len(word))


def _upper(r: random.Random) -> tuple[str, str]:
    word = _word(r)
    return f"Write {word} in capitals.", word.upper()


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add, "sort": _sort, "reverse": _reverse, "count": _count, "upper": _upper}


def task_pairs(seed: int, n: int) -> list[tuple[str, str]]:
    r = random.Random(seed)
    kinds = list(TASKS.values())
    return [kinds[i % len(kinds)](r) for i in range(n)]


def task_records(seed: int = 0, n_train: int = 2000, n_val: int = 100) -> tuple[list, list]:
    """(training conversations, held-out conversations); a held-out question never appears in training."""
    val_pairs = task_pairs(10_000 + seed, n_val)
    held = {q for q, _ in val_pairs}
    train_pairs = [p for p in task_pairs(seed, n_train + n_val) if p[0] not in held][:n_train]

    def conv(q: str, a: str) -> list[dict[str, str]]:
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]

    return [conv(q, a) for q, a in train_pairs], [conv(q, a) for q, a in val_pairs]


def task_preferences(seed: int = 0, n_train: int = 2000, n_val: int = 100) -> tuple[list, list]:
    """The built-in tasks as preference records: the correct answer chosen, another question's answer (wrong for this
    one, most often of another kind: a number where capitals were asked) rejected; (training records, held-out)."""
    r = random.Random(seed + 1)

    def records(convs: list) -> list[dict]:
        answers = [conv[1]["content"] for conv in convs]
        out = []
        for conv in convs:
            right = conv[1]["content"]
            wrong = r.choice(answers)
            while wrong == right:
                wrong = r.choice(answers)
            out.append({"prompt": conv[:1], "chosen": right, "rejected": wrong})
        return out

    train, val = task_records(seed, n_train, n_val)
    return records(train), records(val)
