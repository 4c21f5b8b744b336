"""Data errors and the data report: every record the pipeline changes or drops is counted.

Malformed input (bad JSON, missing fields, wrong types) raises `DataError` at once. Records
that are valid but imperfect (an empty response, a document longer than `seq_length`, ...)
are *problems*: by default they are handled as described in `PROBLEMS` and counted in a
`DataReport` with the first few `file:line` examples, which the trainer logs at start. In
strict mode the first problem raises `DataError` instead.
"""

from dataclasses import dataclass, field

MAX_EXAMPLES = 5

# Problem kind -> what the pipeline does with such a record (shown in the report and errors).
PROBLEMS = {
    "empty_response": "empty response: kept, only the EOS token is trained",
    "no_assistant_turn": "chat record without an assistant turn: dropped",
    "trailing_messages": (
        "chat messages after the last assistant turn: ignored "
        "(the document ends after the last assistant turn)"
    ),
    "truncated": (
        "document longer than seq_length positions: truncated to seq_length "
        "(its last position is then not terminal)"
    ),
    "no_response_in_window": (
        "prompt leaves no response token within seq_length positions: dropped"
    ),
}


class DataError(ValueError):
    """Bad training data or data configuration; the message names the file and line."""


@dataclass
class DataReport:
    """Counts of what the pipeline read, built and changed, for one data file.

    Mutated by the readers and by packing through `add_problem` and the counters.
    """

    source: str
    strict: bool = False
    chat_rendering: str = ""  # how chat records are rendered (chat_template.describe_rendering)
    num_records: int = 0  # valid JSONL records read
    num_documents: int = 0  # records that became tokenized documents
    num_packed_documents: int = 0  # documents placed in rows (dropped ones excluded)
    num_rows: int = 0
    seq_length: int = 0
    num_trained_positions: int = 0  # positions with loss_mask 1 over all rows
    problem_counts: dict = field(default_factory=dict)  # kind -> count
    problem_examples: dict = field(default_factory=dict)  # kind -> ["file:line", ...]

    def add_problem(self, kind: str, where: str) -> None:
        """Count one problem of `kind` at `where` ("file:line"); raise in strict mode."""
        if kind not in PROBLEMS:
            raise KeyError(f"unknown data problem kind {kind!r}")
        if self.strict:
            raise DataError(f"{where}: {PROBLEMS[kind]} (raised because of --strict-data)")
        self.problem_counts[kind] = self.problem_counts.get(kind, 0) + 1
        examples = self.problem_examples.setdefault(kind, [])
        if len(examples) < MAX_EXAMPLES:
            examples.append(where)

    def merge_problems(self, counts: dict, examples: dict) -> None:
        """Add problems recorded earlier (e.g. at preprocessing); in strict mode raise on any."""
        for kind, count in counts.items():
            if count and self.strict:
                where = examples.get(kind, [self.source])[0]
                raise DataError(
                    f"{where}: {PROBLEMS[kind]} ({count} such records found at preprocessing; "
                    "raised because of --strict-data)"
                )
            self.problem_counts[kind] = self.problem_counts.get(kind, 0) + count
            merged = self.problem_examples.setdefault(kind, [])
            merged.extend(examples.get(kind, [])[: MAX_EXAMPLES - len(merged)])

    @property
    def num_problems(self) -> int:
        return sum(self.problem_counts.values())

    def format(self) -> str:
        """Multi-line human-readable summary for the training log."""
        positions = self.num_rows * self.seq_length
        fill = 100.0 * self.num_trained_positions / positions if positions else 0.0
        lines = [
            f"data {self.source}: {self.num_records} records, {self.num_documents} documents, "
            f"{self.num_packed_documents} packed into {self.num_rows} rows of {self.seq_length} "
            f"positions, {self.num_trained_positions} trained positions ({fill:.1f}%)"
        ]
        if self.chat_rendering:
            lines.append(f"  chat records rendered with: {self.chat_rendering}")
        if not self.num_problems:
            lines.append("  no records changed or dropped")
        for kind, count in sorted(self.problem_counts.items()):
            shown = ", ".join(self.problem_examples.get(kind, []))
            more = ", ..." if count > len(self.problem_examples.get(kind, [])) else ""
            lines.append(f"  {count} x {PROBLEMS[kind]} (e.g. {shown}{more})")
        return "\n".join(lines)
