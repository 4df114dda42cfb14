"""The default radius is scale-free and survives bf16 (DESIGN §2.12), on the real pretrained MiniLM.

Routing only depends on the keys and the database, so the edits here are committed without training
(``open_block`` + ``commit``): the block content is irrelevant to where inputs route.
"""

import json

import pytest
import torch

import melo_fast
from tests.conftest import ZSRE_DEV

classifier = pytest.importorskip("melo_fast.eval.classifier")
try:
    classifier.minilm_path()
except ImportError as err:
    pytest.skip(str(err), allow_module_level=True)

UNRELATED = [
    "Where is the nearest train station?",
    "My grandmother grows tomatoes in her garden.",
    "How do I reset my password?",
    "The concert was cancelled because of rain.",
    "Which team won the cup last year?",
    "Please send me the invoice by Friday.",
]


@pytest.fixture(scope="module")
def minilm():
    return classifier.load_minilm()


@pytest.fixture(scope="module")
def questions():
    records = json.loads(ZSRE_DEV.read_text())
    subjects, picked = set(), []
    for record in records:  # one question per subject, so no two edits are about the same thing
        if record["subject"] not in subjects:
            subjects.add(record["subject"])
            picked.append(record["prompt"])
        if len(picked) == 8:
            return picked
    raise AssertionError("the dev data has fewer than 8 subjects")


def patched(minilm, scale, dtype):
    encoder, tokenizer = minilm
    model = type(encoder)(encoder.config).eval()
    model.load_state_dict(encoder.state_dict())
    model.to(dtype)
    editor = melo_fast.patch(model, tokenizer=tokenizer)
    router = dict(model.named_modules())[editor.config.router]
    with torch.no_grad():  # scale the router's output (and so every key) by `scale`
        router.weight.mul_(scale)
        router.bias.mul_(scale)
    return editor, tokenizer


def encode(tokenizer, texts):
    return dict(tokenizer(list(texts), return_tensors="pt", padding=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
def test_routing_does_not_depend_on_the_key_scale_or_the_dtype(minilm, questions, scale, dtype):
    editor, tokenizer = patched(minilm, scale, dtype)
    edits = questions[:4]
    batch = {**encode(tokenizer, edits), "labels": torch.arange(len(edits))}
    editor.open_block(batch)
    editor.commit()
    radius = editor.db.init_radius
    assert radius == pytest.approx(editor.config.relative_radius * editor.db.key_scale)

    # Asked alone, in a batch with other prompts (other padding, other bf16 rounding), and in another order.
    alone = [editor.route(encode(tokenizer, [q])).item() for q in edits]
    assert alone == [0, 0, 0, 0]
    mixed = edits[2:] + UNRELATED[:3] + questions[4:] + edits[:2]
    expected = [0, 0] + [-1] * 3 + [-1] * 4 + [0, 0]
    assert editor.route(encode(tokenizer, mixed)).tolist() == expected
    assert editor.route(encode(tokenizer, UNRELATED)).tolist() == [-1] * len(UNRELATED)


def test_the_radius_scales_with_the_keys(minilm):
    radii = {}
    for scale in (0.01, 100.0):
        editor, tokenizer = patched(minilm, scale, torch.float32)
        radii[scale] = editor.calibrate(tokenizer)
    assert radii[100.0] / radii[0.01] == pytest.approx(1e4, rel=1e-3)


def test_an_absolute_radius_is_kept_as_given(minilm):
    encoder, tokenizer = minilm
    model = type(encoder)(encoder.config).eval()
    editor = melo_fast.patch(model, melo_fast.MeloConfig(init_radius=0.5))
    assert editor.db.init_radius == 0.5 and editor.db.key_scale is None
