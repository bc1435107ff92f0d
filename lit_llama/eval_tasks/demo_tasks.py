"""The documents of the tasks in this folder, built from lit_llama/demo_instructions.json (the offline demo's 195
short instructions and answers), so that they run without a download. lm-eval imports this file by its path
(`!function demo_tasks.NAME` in the YAML files), not as part of the package: it uses nothing of lit_llama."""

import json
from pathlib import Path
from typing import Any, Dict, List

import datasets

RECORDS = Path(__file__).resolve().parents[1] / "demo_instructions.json"
CHOICES = 4


def questions() -> List[Dict[str, str]]:
    """{"question", "answer"} per record, in the order of the questions' text: neighbours are questions of the
    same kind ("What is the opposite of hot?", "... of win?"), which makes them good wrong answers for each other."""
    records = json.loads(RECORDS.read_text())
    docs = [{"question": " ".join(filter(None, (r["instruction"], r.get("input", "")))), "answer": r["output"]}
            for r in records]
    return sorted(docs, key=lambda doc: doc["question"])


def load_demo_choice(**metadata: Any) -> Dict[str, datasets.Dataset]:
    """Multiple choice: each question with its own answer and the answers of the next three questions (in
    that order), the right one at position i % 4, so that always picking one position scores 25%."""
    docs = questions()
    rows = []
    for i, doc in enumerate(docs):
        wrong: List[str] = []
        j = i
        while len(wrong) < CHOICES - 1:
            j = (j + 1) % len(docs)
            if docs[j]["answer"] != doc["answer"] and docs[j]["answer"] not in wrong:
                wrong.append(docs[j]["answer"])
        label = i % CHOICES
        rows.append({"question": doc["question"], "choices": wrong[:label] + [doc["answer"]] + wrong[label:],
                     "label": label})
    return {"test": datasets.Dataset.from_list(rows)}


def load_demo_answer(**metadata: Any) -> Dict[str, datasets.Dataset]:
    """Generation: each question and its answer."""
    return {"test": datasets.Dataset.from_list(questions())}
