"""Generate the arithmetic word-problem task: SFT splits with many valid solutions per prompt,
and a plain-text pre-training corpus.

A problem is a short story about one person's items: a start (a count, or groups such as
"3 bags of 4 apples") and two or three events (buying or getting more, possibly in groups;
giving away, losing or selling some). The answer is the count at the end. A worked solution
is a list of two or three steps, one equation "X op Y = Z" each (op: +, -, x), then a
GSM8k-style final line "#### <answer>". Many solutions are valid for one problem: the terms
may be added in story order or with the gains first in any order (then the losses), the
products computed first or when needed, two losses subtracted one by one or pooled, and
every step has three phrasings.
Each record's response is ONE valid solution drawn at random, so the data itself holds
many valid outputs per prompt.

Files written to --output-dir (records are JSONL the trainer's loader reads):
- train.jsonl, valid.jsonl, test.jsonl: {"prompt": "Q: <story>\\nA:", "response":
  " <steps>\\n#### <n>", "answer": "<n>"}; "answer" is the gold final answer (training
  ignores it). The splits hold disjoint problems (compared by their numbers and kinds of
  terms, not by names or wording).
- pretrain.jsonl: {"prompt": "", "response": <document>}: the whole text is trained on
  (an empty prompt is a context of BOS alone). Half the documents are stories worked step
  by step in prose (no "Q:" / "####" format; their problems are disjoint from all SFT
  splits), the rest arithmetic facts ("4 x 5 = 20. 20 + 7 = 27.", drawn from solution
  steps) and short statements, 2:1.
- tokenizer.model (trained separately, below): 320 sentencepiece BPE pieces, every digit a
  piece of its own. With it the default files have prompts of at most 47 tokens, responses
  of at most 51 (about 39 on average) and pre-training documents of at most 90, so every
  document fits 128 positions and `megatron-irl eval --max-new-tokens 64` fits every prompt.

The output depends only on --seed and the sizes. The bundled files in examples/arithmetic
were made, byte for byte, by

    python tools/make_arithmetic_data.py --output-dir examples/arithmetic --seed 2024
    python tools/train_tokenizer.py --input examples/arithmetic/pretrain.jsonl \\
        examples/arithmetic/train.jsonl --output examples/arithmetic/tokenizer.model \\
        --vocab-size 320 --split-digits

`check_response(prompt, response, answer)` lists what is wrong with a solution (an empty
list when it is a valid worked solution); evaluation can use it beyond the final answer.
"""

import argparse
import json
import os
import random
import re
from dataclasses import dataclass

HE_NAMES = ["Tom", "Sam", "Ben", "Max", "Leo", "Dan", "Joe", "Tim"]
SHE_NAMES = ["Ann", "Mia", "Eva", "Zoe", "Amy", "Kim", "Lily", "Rose"]
ITEMS = ["apples", "pens", "eggs", "cards", "coins", "books", "shells", "cookies", "marbles"]
CONTAINERS = ["bags", "boxes", "packs", "jars", "baskets"]

START, GAIN, LOSS = "start", "gain", "loss"
SPLITS = ("train", "valid", "test", "pretrain")
DEFAULT_SIZES = {"train": 6000, "valid": 300, "test": 300, "pretrain": 16000}
DEFAULT_SEED = 2024

# Number ranges (inclusive). Small on purpose: a model of about a million parameters learns
# the facts they need within minutes on a CPU.
FACTOR = (2, 5)  # groups and items per group
COUNT = (2, 9)  # items bought, found, given away, lost or sold
START_COUNT = (4, 12)  # a start without groups
MAX_STEPS = 3

# Problem sentences; {N} name, {P}/{p} pronoun, {F} friend, {I} items, {C} containers.
STORY = {
    (START, False): ["{N} has {n} {I}.", "{N} starts with {n} {I}."],
    (START, True): ["{N} has {a} {C} of {b} {I}.", "{N} has {a} {C} with {b} {I} in each."],
    (GAIN, False): ["{P} buys {n} more {I}.", "{P} finds {n} more {I}.",
                    "{P} gets {n} {I} from {F}."],
    (GAIN, True): ["{P} buys {a} {C} of {b} {I}.", "{P} gets {a} more {C} with {b} {I} in each."],
    (LOSS, False): ["{P} gives {n} {I} to {F}.", "{P} loses {n} {I}.", "{P} sells {n} {I}."],
}
QUESTIONS = ["How many {I} does {N} have now?", "How many {I} does {p} have in the end?"]

# Solution steps: {x} op {y} = {z}; every template holds exactly one equation.
STEPS = {
    "product": ["{x} x {y} = {z}.", "{x} {C} of {y} is {x} x {y} = {z}.",
                "There are {x} x {y} = {z} {I}."],
    "add": ["{x} + {y} = {z}.", "That makes {x} + {y} = {z}.", "Then {x} + {y} = {z} {I}."],
    "pool": ["{x} + {y} = {z}.", "{x} + {y} = {z} are gone.", "{P} gives up {x} + {y} = {z}."],
    "sub": ["{x} - {y} = {z}.", "{P} keeps {x} - {y} = {z}.", "{x} - {y} = {z} are left."],
}

EQUATION = re.compile(r"(\d+) ([+x-]) (\d+) = (\d+)")
FINAL = re.compile(r"\n#### (\d+)\s*$")
SIGNS = {"product": "x", "add": "+", "pool": "+", "sub": "-"}
OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "x": lambda x, y: x * y}


@dataclass(frozen=True)
class Term:
    """One quantity of a story: `count` items, or `count` groups of `size` (size > 0)."""

    kind: str  # START, GAIN or LOSS
    count: int
    size: int = 0

    @property
    def value(self) -> int:
        return self.count * self.size if self.size else self.count


@dataclass(frozen=True)
class Problem:
    """A story's terms (in story order) and its wording choices."""

    terms: tuple[Term, ...]
    name: str
    friend: str
    items: str
    containers: str
    sentences: tuple[int, ...]  # template index per term, then the question's

    @property
    def key(self) -> str:
        """Identity for split disjointness: kinds and numbers, not names or wording."""
        return ";".join(f"{t.kind}:{t.count}:{t.size}" for t in self.terms)

    @property
    def answer(self) -> int:
        return sum(-t.value if t.kind == LOSS else t.value for t in self.terms)

    def fields(self) -> dict:
        he = self.name in HE_NAMES
        return {"N": self.name, "P": "He" if he else "She", "p": "he" if he else "she",
                "F": self.friend, "I": self.items, "C": self.containers}


def term_sentence(problem: Problem, index: int) -> str:
    term = problem.terms[index]
    templates = STORY[(term.kind, term.size > 0)]
    template = templates[problem.sentences[index] % len(templates)]
    return template.format(n=term.count, a=term.count, b=term.size, **problem.fields())


def prompt_of(problem: Problem) -> str:
    sentences = [term_sentence(problem, i) for i in range(len(problem.terms))]
    question = QUESTIONS[problem.sentences[-1] % len(QUESTIONS)].format(**problem.fields())
    return "Q: " + " ".join(sentences + [question]) + "\nA:"


def random_problem(rng: random.Random) -> Problem:
    """3 or 4 terms, at most MAX_STEPS solution steps ((terms - 1) + products); counts in
    the story are >= 2 (plural nouns) and the running count stays >= 1 in story order, so
    every order of `solution_steps` keeps it >= 1 too."""
    num_terms = rng.choice([3, 3, 4])
    while True:
        terms = [Term(START, rng.randint(*FACTOR), rng.randint(*FACTOR)) if rng.random() < 0.5
                 else Term(START, rng.randint(*START_COUNT))]
        running = terms[0].value
        for _ in range(num_terms - 1):
            kind = rng.choices([GAIN, LOSS], weights=[0.6, 0.4])[0]
            if kind == LOSS and running >= COUNT[0] + 1:
                terms.append(Term(LOSS, rng.randint(COUNT[0], min(COUNT[1], running - 1))))
            elif rng.random() < 0.4:
                terms.append(Term(GAIN, rng.randint(*FACTOR), rng.randint(*FACTOR)))
            else:
                terms.append(Term(GAIN, rng.randint(*COUNT)))
            running += -terms[-1].value if terms[-1].kind == LOSS else terms[-1].value
        if num_terms - 1 + sum(t.size > 0 for t in terms) <= MAX_STEPS:
            break
    name = rng.choice(HE_NAMES + SHE_NAMES)
    friend = rng.choice([n for n in HE_NAMES + SHE_NAMES if n != name])
    return Problem(tuple(terms), name, friend, rng.choice(ITEMS), rng.choice(CONTAINERS),
                   tuple(rng.randrange(6) for _ in range(num_terms + 1)))


Step = tuple[str, int, int, int]  # (role: product/add/pool/sub, x, y, z): "x op y = z"


def ordered_steps(terms: list[Term], products_first: list[Term], pool: bool) -> list[Step]:
    """The steps that add up `terms` in this order (losses must come after enough gains).

    `products_first`: groups multiplied out before anything else, in this order; the other
    groups are multiplied when their term is added. `pool`: the losses are summed first and
    subtracted once, after all gains.
    """
    steps = [("product", t.count, t.size, t.value) for t in products_first]
    losses = [t for t in terms if t.kind == LOSS]
    total = None
    for term in terms:
        if pool and term.kind == LOSS:
            continue
        if term.size and not any(s[0] == "product" and s[1:3] == (term.count, term.size)
                                 for s in steps):
            steps.append(("product", term.count, term.size, term.value))
        if total is None:
            total = term.value
        elif term.kind == LOSS:
            steps.append(("sub", total, term.value, total - term.value))
            total -= term.value
        else:
            steps.append(("add", total, term.value, total + term.value))
            total += term.value
    if pool:
        lost = losses[0].value
        for term in losses[1:]:
            steps.append(("pool", lost, term.value, lost + term.value))
            lost += term.value
        steps.append(("sub", total, lost, total - lost))
    return steps


def solution_steps(problem: Problem, rng: random.Random) -> list[Step]:
    """One valid order of steps, drawn at random.

    Choices: term order (story order, or the gains shuffled then the losses shuffled),
    products computed all first (in a random order) or when their term is needed, and
    (with two or more losses) losses pooled into one subtraction or subtracted one by one.
    """
    terms = list(problem.terms)
    if rng.random() < 0.5:
        gains = [t for t in terms if t.kind != LOSS]
        losses = [t for t in terms if t.kind == LOSS]
        rng.shuffle(gains)
        rng.shuffle(losses)
        terms = gains + losses
    products = [t for t in terms if t.size]
    products_first = rng.sample(products, len(products)) if rng.random() < 0.5 else []
    pool = sum(t.kind == LOSS for t in terms) >= 2 and rng.random() < 0.5
    return ordered_steps(terms, products_first, pool)


def write_solution(problem: Problem, rng: random.Random) -> str:
    """A response: one random valid solution, each step in a random phrasing, then the
    final answer line."""
    fields = problem.fields()
    lines = [rng.choice(STEPS[role]).format(x=x, y=y, z=z, **fields)
             for role, x, y, z in solution_steps(problem, rng)]
    return " " + "\n".join(lines + [f"#### {problem.answer}"])


def check_response(prompt: str, response: str, answer: str) -> list[str]:
    """What is wrong with a worked solution; [] when it is valid.

    Valid: at least one equation; every equation is correct; each operand is a number of
    the prompt or the result of an earlier equation; the last equation's result is the
    final answer; the response ends with "\\n#### <answer>".
    """
    problems = []
    final = FINAL.search(response)
    if final is None:
        problems.append("no final line '#### <number>' at the end")
    elif final.group(1) != answer:
        problems.append(f"final answer {final.group(1)} != {answer}")
    known = [int(n) for n in re.findall(r"\d+", prompt)]
    equations = EQUATION.findall(response)
    if not equations:
        problems.append("no equation 'X op Y = Z'")
    for x, op, y, z in equations:
        x, y, z = int(x), int(y), int(z)
        if OPS[op](x, y) != z:
            problems.append(f"wrong step {x} {op} {y} = {z}")
        for operand in (x, y):
            if operand not in known:
                problems.append(f"operand {operand} of {x} {op} {y} is neither given nor derived")
        known.append(z)
    if equations and equations[-1][3] != answer:
        problems.append(f"last step's result {equations[-1][3]} != final answer {answer}")
    return problems


def record(problem: Problem, rng: random.Random) -> dict:
    return {"prompt": prompt_of(problem), "response": write_solution(problem, rng),
            "answer": str(problem.answer)}


# --- pre-training corpus ---------------------------------------------------------------


def story_document(problem: Problem, rng: random.Random) -> str:
    """The story told in prose and worked out in story order: each quantity right after
    its sentence, or all of them after the story."""
    f = problem.fields()
    sentences = [term_sentence(problem, i) for i in range(len(problem.terms))]
    prose = {"product": "That is {x} x {y} = {z} {I}.", "add": "Then {x} + {y} = {z}.",
             "sub": "Then {x} - {y} = {z}."}
    if rng.random() < 0.5:
        out = []
        for i, sentence in enumerate(sentences):
            steps = ordered_steps(list(problem.terms[: i + 1]), [], False)
            done = len(ordered_steps(list(problem.terms[:i]), [], False))
            out.append(" ".join([sentence] + [prose[role].format(x=x, y=y, z=z, **f)
                                              for role, x, y, z in steps[done:]]))
    else:
        steps = ordered_steps(list(problem.terms), [], False)
        out = sentences + [rng.choice(["To count them:", "We count:"])]
        out += [STEPS[role][0].format(x=x, y=y, z=z) for role, x, y, z in steps]
    out.append(rng.choice([f"In the end {f['N']} has {problem.answer} {f['I']}.",
                           f"So {f['p']} has {problem.answer} {f['I']} left."]))
    return " ".join(out)


def facts_document(rng: random.Random) -> str:
    """Five to eight arithmetic facts, taken from the steps of random problems' solutions so
    that they come in the proportions the task uses."""
    facts = []
    count = rng.randint(5, 8)
    while len(facts) < count:
        steps = solution_steps(random_problem(rng), rng)
        facts += [f"{x} {SIGNS[role]} {y} = {z}." for role, x, y, z in steps]
    return " ".join(facts[:count])


def statements_document(rng: random.Random) -> str:
    """Two to four short statements about people, items and containers."""
    templates = [
        "{N} likes {I}.", "Each of the {C} holds {k} {I}.", "{N} and {F} count {I}.",
        "{N} has {k} {C}.", "{F} gives {N} some {I}.", "{N} keeps the {I} in {C}.",
        "After {k} comes {k1}.", "{k} is less than {k1}.",
    ]
    out = []
    for _ in range(rng.randint(2, 4)):
        name, friend = rng.sample(HE_NAMES + SHE_NAMES, 2)
        k = rng.randint(1, 99)
        out.append(rng.choice(templates).format(
            N=name, F=friend, I=rng.choice(ITEMS), C=rng.choice(CONTAINERS), k=k, k1=k + 1))
    return " ".join(out)


def pretrain_documents(problems: list[Problem], num_documents: int,
                       rng: random.Random) -> list[dict]:
    """One story per problem, the rest facts and statements (2:1), in a random order."""
    others = num_documents - len(problems)
    kinds = ["story"] * len(problems) + ["facts"] * (others * 2 // 3)
    kinds += ["statements"] * (num_documents - len(kinds))
    rng.shuffle(kinds)
    stories = iter(problems)
    docs = []
    for kind in kinds:
        if kind == "story":
            text = story_document(next(stories), rng)
        else:
            text = facts_document(rng) if kind == "facts" else statements_document(rng)
        docs.append({"prompt": "", "response": text})
    return docs


# --- splits and files ----------------------------------------------------------------


def unique_problems(rng: random.Random, count: int, taken: dict) -> list[Problem]:
    """`count` problems whose keys are not in `taken` (mutated: their keys are added).

    There are about 35,000 distinct problems; asking for nearly all of them fails.
    """
    out = []
    for _ in range(100 * count):
        if len(out) == count:
            break
        problem = random_problem(rng)
        if problem.key not in taken:
            taken[problem.key] = True
            out.append(problem)
    if len(out) < count:
        raise ValueError(f"found only {len(out)} of {count} new distinct problems; "
                         "lower --num-train/--num-valid/--num-test/--num-pretrain")
    return out


def make_dataset(seed: int, sizes: dict) -> tuple[dict, dict]:
    """(problems, records), each {split: list}, for SPLITS; `sizes` maps split -> records.

    Problems of all splits are pairwise distinct by `Problem.key`; the pretrain split's
    problems are those told as stories (half its documents).
    """
    rng = random.Random(seed)
    taken: dict = {}  # insertion-ordered: keeps generation independent of hash seeds
    counts = {**sizes, "pretrain": sizes["pretrain"] // 2}
    problems = {split: unique_problems(rng, counts[split], taken) for split in SPLITS}
    records = {split: [record(p, rng) for p in problems[split]] for split in SPLITS[:3]}
    records["pretrain"] = pretrain_documents(problems["pretrain"], sizes["pretrain"], rng)
    return problems, records


def write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output-dir", default="examples/arithmetic")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    for split in SPLITS:
        parser.add_argument(f"--num-{split}", type=int, default=DEFAULT_SIZES[split],
                            help=f"records in {split}.jsonl")
    args = parser.parse_args()
    sizes = {split: getattr(args, f"num_{split}") for split in SPLITS}
    os.makedirs(args.output_dir, exist_ok=True)
    for split, records in make_dataset(args.seed, sizes)[1].items():
        write_jsonl(os.path.join(args.output_dir, f"{split}.jsonl"), records)
        print(f"wrote {len(records)} {split} records")


if __name__ == "__main__":
    main()
