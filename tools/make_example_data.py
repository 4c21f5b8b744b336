"""Generate the bundled example SFT data: short arithmetic and word tasks, several phrasings.

Every question has one correct answer (stored in the record's extra "answer" field, which
training ignores and evaluation can check) but several valid phrasings of the response, so
samples can be scored for validity and diversity. The output depends only on --seed.
Questions are split into train/valid by their content (task and arguments), so no
validation question appears in training.

    python tools/make_example_data.py --output-dir examples/data
"""

import argparse
import json
import os
import random

WORDS = [
    "cat", "dog", "sun", "map", "red", "box", "tree", "fish", "bird", "milk",
    "star", "moon", "rain", "lamp", "book", "door", "frog", "ship", "cake", "rose",
]  # fmt: skip


def addition(rng):
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    question = rng.choice(
        [
            f"What is {a} plus {b}?",
            f"Add {a} and {b}.",
            f"Compute {a} + {b}.",
            f"What is the sum of {a} and {b}?",
        ]
    )
    c = a + b
    responses = [
        f"{c}", f"{a} plus {b} is {c}.", f"The answer is {c}.", f"{a} + {b} = {c}", f"It is {c}."
    ]  # fmt: skip
    return ("add", a, b), question, responses, str(c)


def subtraction(rng):
    a = rng.randint(0, 20)
    b = rng.randint(0, a)
    question = rng.choice(
        [f"What is {a} minus {b}?", f"Subtract {b} from {a}.", f"Compute {a} - {b}."]
    )
    c = a - b
    responses = [
        f"{c}", f"{a} minus {b} is {c}.", f"The answer is {c}.", f"{a} - {b} = {c}", f"It is {c}."
    ]  # fmt: skip
    return ("sub", a, b), question, responses, str(c)


def successor(rng):
    n = rng.randint(0, 50)
    question = rng.choice([f"What number comes after {n}?", f"What is the next number after {n}?"])
    m = n + 1
    responses = [f"{m}", f"The number after {n} is {m}.", f"It is {m}.", f"{m} comes after {n}."]
    return ("next", n), question, responses, str(m)


def larger(rng):
    a, b = rng.sample(range(0, 50), 2)
    question = rng.choice(
        [f"Which is larger, {a} or {b}?", f"Which number is bigger: {a} or {b}?"]
    )
    m = max(a, b)
    responses = [
        f"{m}", f"{m} is larger.", f"The larger one is {m}.", f"{m} is bigger than {min(a, b)}."
    ]  # fmt: skip
    return ("max", a, b), question, responses, str(m)


def parity(rng):
    n = rng.randint(0, 50)
    question = rng.choice([f"Is {n} even or odd?", f"Is the number {n} odd or even?"])
    p = "even" if n % 2 == 0 else "odd"
    responses = [f"{p}", f"{n} is {p}.", f"It is {p}.", f"The number {n} is {p}."]
    return ("parity", n), question, responses, p


def reverse_word(rng):
    w = rng.choice(WORDS)
    question = rng.choice(
        [f"Spell {w} backwards.", f"Reverse the word {w}.", f"What is {w} written backwards?"]
    )
    r = w[::-1]
    responses = [f"{r}", f"{w} backwards is {r}.", f"Reversed, it is {r}.", f"It is {r}."]
    return ("reverse", w), question, responses, r


def count_letters(rng):
    w = rng.choice(WORDS)
    question = rng.choice([f"How many letters are in {w}?", f"Count the letters in {w}."])
    n = len(w)
    responses = [
        f"{n}", f"{w} has {n} letters.", f"There are {n} letters.", f"It has {n} letters."
    ]  # fmt: skip
    return ("letters", w), question, responses, str(n)


TASKS = [addition, subtraction, successor, larger, parity, reverse_word, count_letters]


def make_records(num_records: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(num_records):
        key, question, responses, answer = rng.choice(TASKS)(rng)
        records.append(
            {
                "prompt": f"Q: {question}\nA:",
                "response": " " + rng.choice(responses),
                "answer": answer,
                "key": "/".join(map(str, key)),
            }
        )
    return records


def split_by_question(records: list[dict], valid_fraction: float, seed: int):
    """(train, valid): whole question keys go to one side; the key field is then removed."""
    keys = sorted({r["key"] for r in records})
    random.Random(seed + 1).shuffle(keys)
    valid_keys = set(keys[: int(len(keys) * valid_fraction)])
    train, valid = [], []
    for r in records:
        (valid if r.pop("key") in valid_keys else train).append(r)
    return train, valid


def write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", default="examples/data")
    parser.add_argument("--num-records", type=int, default=2000)
    parser.add_argument("--valid-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    records = make_records(args.num_records, args.seed)
    train, valid = split_by_question(records, args.valid_fraction, args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    write_jsonl(os.path.join(args.output_dir, "train.jsonl"), train)
    write_jsonl(os.path.join(args.output_dir, "valid.jsonl"), valid)
    print(f"wrote {len(train)} train and {len(valid)} valid records to {args.output_dir}")


if __name__ == "__main__":
    main()
