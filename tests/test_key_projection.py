"""The key projection: routing by trained keys, saved with the edits, and its training.

``KeyProjection`` maps router keys to unit keys; an editor given one routes, edits, saves, reloads and
exports through it; ``train_key_projection`` learns one from facts in several wordings and chooses its
radius on held-out facts; ``facts_from_records`` builds those facts from KnowEdit records.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

import melo_fast
from melo_fast import Fact, KeyProjection
from melo_fast.editing import key_projection_training
from melo_fast.editing.key_projection_training import RADIUS_GRID, _choose_radius, _stopped_by
from melo_fast.editing.number_negatives import neighbouring_numbers, number_negatives
from melo_fast.eval.data import EditRecord, Probe
from melo_fast.eval.paraphrase_facts import facts_from_records
from tests.tiny_models import build

PROMPT, TARGET = "The capital of France is", "Rome"


def _projection(router: str, width: int, rank: int = 8, radius: float = 0.5, key_position="last") -> KeyProjection:
    generator = torch.Generator().manual_seed(1)
    mean = torch.randn(width, generator=generator)
    std = torch.rand(width, generator=generator) + 0.5
    weight = torch.randn(rank, width, generator=generator)
    return KeyProjection(mean, std, weight, radius, router, key_position, {"note": "test"})


def _gpt2_with_projection(**config):
    family = build("gpt2")
    probe = melo_fast.patch(family.model, melo_fast.MeloConfig(**config), tokenizer=family.tokenizer)
    router, width = probe.config.router, probe.router.key_width
    melo_fast.unpatch(family.model)
    projection = _projection(router, width)
    editor = melo_fast.patch(
        family.model, melo_fast.MeloConfig(**config), tokenizer=family.tokenizer, key_projection=projection
    )
    return family, editor, projection


# --- the map ---------------------------------------------------------------------------------------
def test_the_projection_is_the_normalized_map_of_the_standardized_keys():
    projection = _projection("r", 6, rank=4)
    keys = torch.randn(5, 6)
    expected = ((keys - projection.mean) / projection.std) @ projection.weight.T
    expected = expected / expected.norm(dim=1, keepdim=True)
    out = projection(keys)
    assert out.shape == (5, 4) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(projection(keys.to(torch.bfloat16)), projection(keys.to(torch.bfloat16).float()))


def test_bad_projections_and_keys_are_refused_with_what_is_wrong():
    with pytest.raises(ValueError, match=r"mean \[d\], std \[d\] and weight \[rank, d\]"):
        KeyProjection(torch.zeros(3), torch.ones(3), torch.zeros(2, 4), 0.5, "r", "last")
    with pytest.raises(ValueError, match="std must be finite and > 0"):
        KeyProjection(torch.zeros(3), torch.tensor([1.0, 0.0, 1.0]), torch.zeros(2, 3), 0.5, "r", "last")
    with pytest.raises(ValueError, match=r"radius must be in \(0, 2\]"):
        KeyProjection(torch.zeros(3), torch.ones(3), torch.zeros(2, 3), 2.5, "r", "last")
    with pytest.raises(ValueError, match=r"paraphrase_radii\[2\] must be in \(0, 2\]"):
        KeyProjection(torch.zeros(3), torch.ones(3), torch.zeros(2, 3), 0.5, "r", "last", paraphrase_radii={2: 0.0})
    with pytest.raises(ValueError, match="maps a number of paraphrases >= 1"):
        KeyProjection(torch.zeros(3), torch.ones(3), torch.zeros(2, 3), 0.5, "r", "last", paraphrase_radii={0: 0.4})
    with pytest.raises(ValueError, match="conflict_rule must be one of"):
        KeyProjection(torch.zeros(3), torch.ones(3), torch.zeros(2, 3), 0.5, "r", "last", conflict_rule="merge")
    with pytest.raises(ValueError, match=r"takes \[N, 6\] keys of router 'r'"):
        _projection("r", 6)(torch.randn(2, 5))


def test_a_saved_projection_loads_identical(tmp_path):
    projection = _projection("h.1.mlp.c_fc", 6, key_position="mean")
    projection.paraphrase_radii = {1: 0.4, 3: 0.3}
    projection.save(tmp_path / "p.safetensors")
    loaded = KeyProjection.load(tmp_path / "p.safetensors")
    for name, tensor in projection.tensors().items():
        assert torch.equal(loaded.tensors()[name], tensor)
    assert loaded.meta() == projection.meta() and loaded.paraphrase_radii == {1: 0.4, 3: 0.3}
    # The largest number calibrated up to the one given; beyond the last, the last.
    assert [loaded.radius_for(k) for k in range(6)] == [0.5, 0.4, 0.4, 0.3, 0.3, 0.3]
    # A projection saved before paraphrase radii existed: edits in several wordings use its one radius.
    meta = {k: v for k, v in projection.meta().items() if k != "paraphrase_radii"}
    assert KeyProjection.from_data(projection.tensors(), meta).radius_for(3) == 0.5
    # The conflict rule its radii were chosen under is kept; one saved before the rule was recorded used MELO's.
    projection.conflict_rule = "voronoi"
    projection.save(tmp_path / "v.safetensors")
    assert KeyProjection.load(tmp_path / "v.safetensors").conflict_rule == "voronoi"
    meta = {k: v for k, v in projection.meta().items() if k != "conflict_rule"}
    assert KeyProjection.from_data(projection.tensors(), meta).conflict_rule == "split"
    with pytest.raises(FileNotFoundError, match="no key projection file"):
        KeyProjection.load(tmp_path / "missing.safetensors")
    (tmp_path / "other.safetensors").write_bytes(b"not a projection")
    with pytest.raises(ValueError, match="is not a key projection saved by KeyProjection.save"):
        KeyProjection.load(tmp_path / "other.safetensors")


# --- routing through it ----------------------------------------------------------------------------
def test_a_patched_model_routes_edits_through_the_projection():
    family, editor, projection = _gpt2_with_projection(num_iter=30)
    tokenizer = family.tokenizer
    inputs = tokenizer([PROMPT], return_tensors="pt")
    assert editor.db.dim == projection.out_dim
    with editor.disabled():
        raw_output = {}
        handle = dict(family.model.named_modules())[editor.config.router].register_forward_hook(
            lambda m, a, out: raw_output.setdefault("out", out))
        family.model(**inputs)
        handle.remove()
    raw_key = raw_output["out"][0, -1].float()[None]
    torch.testing.assert_close(editor.keys(inputs), projection(raw_key))
    editor.edit_texts([PROMPT], [TARGET], tokenizer)
    assert editor.db.init_radius == projection.radius  # "auto": the radius the projection chose
    assert editor.route(inputs).tolist() == [0]
    out = family.model.generate(**inputs, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert tokenizer.decode(out[0, -1:]) == " " + TARGET


def test_an_absolute_radius_overrides_the_projections():
    family, editor, projection = _gpt2_with_projection(num_iter=2, init_radius=0.25)
    editor.edit_texts([PROMPT], [TARGET], family.tokenizer)
    assert editor.db.init_radius == 0.25 != projection.radius


@pytest.mark.parametrize("configured, projection_rule, expected", [
    ("auto", "voronoi", "voronoi"),  # the rule the projection's radii were chosen under
    ("auto", "split", "split"),  # a projection saved before the rule was recorded
    ("split", "voronoi", "split"),  # a rule the user names wins
    ("voronoi", "split", "voronoi"),
])
def test_the_database_takes_the_projections_conflict_rule_unless_one_is_named(tmp_path, configured, projection_rule,
                                                                              expected):
    family = build("gpt2")
    probe = melo_fast.patch(family.model, tokenizer=family.tokenizer)
    router, width = probe.config.router, probe.router.key_width
    melo_fast.unpatch(family.model)
    projection = _projection(router, width)
    projection.conflict_rule = projection_rule
    config = melo_fast.MeloConfig(num_iter=2, conflict_rule=configured)
    editor = melo_fast.patch(family.model, config, tokenizer=family.tokenizer, key_projection=projection)
    assert editor.db.conflict_rule == expected
    editor.edit_texts([PROMPT], [TARGET], family.tokenizer)
    editor.save(tmp_path / "edits")
    melo_fast.unpatch(family.model)
    assert melo_fast.load(family.model, tmp_path / "edits").db.conflict_rule == expected
    melo_fast.unpatch(family.model)
    # Without a projection "auto" is MELO's split; an absolute radius is not the projection's: split too.
    assert melo_fast.patch(family.model, config, tokenizer=family.tokenizer).db.conflict_rule == (
        "split" if configured == "auto" else configured)
    melo_fast.unpatch(family.model)
    absolute = config.replace(init_radius=0.25)
    editor = melo_fast.patch(family.model, absolute, tokenizer=family.tokenizer, key_projection=projection)
    assert editor.db.conflict_rule == ("split" if configured == "auto" else configured)


def test_edits_with_a_projection_save_load_and_reload_with_it(tmp_path):
    family, editor, projection = _gpt2_with_projection(num_iter=5)
    tokenizer = family.tokenizer
    editor.edit_texts([PROMPT, "Dogs like to chase"], [TARGET, "cats"], tokenizer)
    editor.save(tmp_path / "edits")
    meta = json.loads((tmp_path / "edits" / "melo_config.json").read_text())
    assert meta["key_projection"]["router"] == projection.router
    texts = [PROMPT, "Dogs like to chase", "An unrelated sentence"]
    routed = [editor.route(tokenizer([t], return_tensors="pt")).item() for t in texts]  # GPT-2: no pad token
    assert routed[:2] == [0, 0]
    melo_fast.unpatch(family.model)

    loaded = melo_fast.load(family.model, tmp_path / "edits")
    assert loaded.state.projection is not None and loaded.db.dim == projection.out_dim
    assert [loaded.route(tokenizer([t], return_tensors="pt")).item() for t in texts] == routed
    melo_fast.unpatch(family.model)

    # reload into an editor of raw keys: the projection comes with the database it keyed.
    plain = melo_fast.patch(family.model, melo_fast.MeloConfig(num_iter=5), tokenizer=tokenizer)
    plain.reload(tmp_path / "edits")
    assert [plain.route(tokenizer([t], return_tensors="pt")).item() for t in texts] == routed


def test_export_carries_the_projection_to_the_routing_folder(tmp_path):
    family, editor, _ = _gpt2_with_projection(num_iter=2)
    editor.edit_texts([PROMPT], [TARGET], family.tokenizer)
    editor.export_peft(tmp_path / "export")
    inputs = family.tokenizer([PROMPT], return_tensors="pt")
    names = editor.adapter_names(inputs)
    melo_fast.unpatch(family.model)
    routing = melo_fast.load(family.model, tmp_path / "export" / "routing")
    assert routing.state.projection is not None
    assert routing.adapter_names(inputs) == names != ["__base__"]


def test_the_projection_is_chosen_before_the_first_edit_only():
    family, editor, projection = _gpt2_with_projection(num_iter=2)
    editor.edit_texts([PROMPT], [TARGET], family.tokenizer)
    with pytest.raises(ValueError, match="chosen before the first edit"):
        editor.use_key_projection(None)
    with pytest.raises(TypeError, match="takes a KeyProjection"):
        editor.use_key_projection("projection.safetensors")


def test_a_projection_of_another_router_is_refused_and_leaves_the_model_unpatched():
    family = build("gpt2")
    with pytest.raises(ValueError, match="trained on the keys of router 'h.9.mlp.c_fc'"):
        melo_fast.patch(family.model, tokenizer=family.tokenizer, key_projection=_projection("h.9.mlp.c_fc", 64))
    editor = melo_fast.patch(family.model, tokenizer=family.tokenizer)  # not patched by the failed call
    wrong_width = _projection(editor.config.router, editor.router.key_width + 1)
    with pytest.raises(ValueError, match=rf"\({editor.router.key_width + 1} wide\)"):
        editor.use_key_projection(wrong_width)
    editor.use_key_projection(_projection(editor.config.router, editor.router.key_width))
    editor.use_key_projection(None)  # back to raw keys before any edit
    assert editor.db.dim == editor.router.key_width and editor.state.projection is None


# --- training --------------------------------------------------------------------------------------
CITIES = ["Paris", "Rome", "Berlin", "Madrid", "Vienna", "Lisbon", "Dublin", "Oslo", "Prague", "Athens", "Warsaw",
          "Helsinki", "Brussels", "Budapest", "Sofia", "Zagreb"]


def _facts() -> list[Fact]:
    """Two questions per city, each in three wordings; the other question of the city is a hard negative."""
    facts = []
    for city in CITIES:
        mayor = (f"Who is the mayor of {city}?", f"{city} is governed by which mayor?", f"The mayor of {city} is")
        river = (f"Which river flows through {city}?", f"{city} lies on which river?", f"The river of {city} is")
        facts += [Fact(mayor, (river[0],), city), Fact(river, (mayor[0],), city)]
    return facts


def _separation(keys_of, facts: list[Fact]) -> float:
    """Mean cosine between wordings of one fact minus mean cosine between wordings of different facts."""
    texts = [t for f in facts for t in f.phrasings]
    owner = torch.tensor([i for i, f in enumerate(facts) for _ in f.phrasings])
    z = torch.nn.functional.normalize(keys_of(texts), dim=1)
    cosine = z @ z.T
    same = (owner[:, None] == owner[None, :]) & ~torch.eye(len(texts), dtype=torch.bool)
    other = owner[:, None] != owner[None, :]
    return (cosine[same].mean() - cosine[other].mean()).item()


def test_training_brings_the_wordings_of_a_fact_together():
    family = build("bert")
    editor = melo_fast.patch(family.model, tokenizer=family.tokenizer)
    facts = _facts()

    def raw(texts):
        return torch.cat([editor.keys(family.tokenizer([t], return_tensors="pt")) for t in texts])

    projection = melo_fast.train_key_projection(editor, facts, rank=16, steps=200, check_every=50, progress=False)
    assert _separation(lambda texts: projection(raw(texts)), facts) > _separation(raw, facts) + 0.2
    info = projection.info
    assert (info["facts"], info["training_facts"] + info["held_out_facts"]) == (32, 32)
    assert info["best_step"] in (50, 100, 150, 200) and info["folds"] == 5 and projection.out_dim == 16
    localities = [v for k, v in info["held_out"].items() if k.startswith("locality_")]
    assert projection.radius == info["held_out"]["radius"] and len(localities) == 4 and min(localities) >= 0.99
    # Each held-out fact is edited once and left unedited once: every negative and wording judges the radius.
    assert info["held_out"]["questions"] == {
        **{f"negatives_{database}": 32 for database in ("few_edits", "many_edits")},
        **{f"never_edited_{database}": 96 for database in ("few_edits", "many_edits")}, "paraphrases": 64}
    # The radius of an edit in several wordings, chosen the same way with 1, 2 and 3 paraphrases per edit.
    worded = info["held_out_paraphrased"]
    assert projection.paraphrase_radii == {k: worded[str(k)]["radius"] for k in (1, 2, 3)}
    for figures in worded.values():  # locality's radius, or the floor of the plain radius's reach
        localities = [v for k, v in figures.items() if k.startswith("locality_")]
        assert figures["floor"] or min(localities) >= 0.99
        assert figures["radius"] <= projection.radius or not figures["floor"]
    assert (projection.router, projection.key_position) == (editor.config.router, editor.config.key_position)
    # Its radii were chosen under the voronoi rule, which an editor routing through it then uses.
    assert projection.conflict_rule == info["conflict_rule"] == "voronoi"
    # What stopped the radius: the held-out questions let in at the next radius of the grid, nearest first.
    stopped = info["held_out"]["stopped_by"]
    if stopped["radius"] is not None:
        assert stopped["radius"] == min(r for r in RADIUS_GRID if r > projection.radius)
        texts = {t for f in facts for t in (*f.phrasings, *f.negatives)}
        listed = stopped["questions"]
        assert all(q["question"] in texts and q["nearest_edit_wording"] in texts for q in listed)
        assert [q["distance"] for q in listed] == sorted(q["distance"] for q in listed)
        assert sum(stopped["let_in"].values()) >= len(listed) > 0
    editor.use_key_projection(projection)  # it fits the editor it was trained for
    assert editor.db.dim == 16 and editor.db.conflict_rule == "voronoi"
    with pytest.raises(ValueError, match="conflict_rule must be one of"):
        melo_fast.train_key_projection(editor, facts, conflict_rule="merge", progress=False)


def test_the_questions_that_stopped_the_radius_are_the_ones_let_in_just_past_it():
    texts = ["q0", "q1", "q2", "edit a", "edit b"]
    r0, r1, r2 = RADIUS_GRID[:3]
    counts = {r: Counter(never_edited_many_edits=100, never_edited_many_edits_kept_out=k)
              for r, k in ((r0, 100), (r1, 99), (r2, 97))}
    let_in = {r0: [], r1: [(0.3, "never_edited", "many_edits", 1, 3)],
              r2: [(0.5, "never_edited", "many_edits", 2, 4), (0.3, "never_edited", "many_edits", 1, 3),
                   (0.4, "never_edited", "few_edits", 1, 3)]}
    stopped = _stopped_by(let_in, counts, r1, 0.99, texts)  # 99 of 100 kept out at r1: r2 stopped it
    assert stopped["radius"] == r2
    assert stopped["let_in"] == {"never_edited_many_edits": 2, "never_edited_few_edits": 1}
    assert [(q["question"], q["nearest_edit_wording"], q["distance"]) for q in stopped["questions"]] == [
        ("q1", "edit a", 0.3), ("q2", "edit b", 0.5)]  # each question once, nearest first
    assert _stopped_by(let_in, counts, r1, 0.99, texts, shown=1)["questions"][0]["question"] == "q1"
    # Where even the smallest radius let in too many, those are the ones shown.
    assert _stopped_by(let_in, counts, r1, 0.995, texts)["radius"] == r1
    assert _stopped_by(let_in, counts, r2, 0.9, texts) == {"radius": None, "let_in": {}, "questions": []}


def _calibration(kept_out: list[int], routed: list[int]) -> dict:
    """Pooled held-out counts at the first radii of the grid: hard negatives kept out and paraphrases routed
    home, each of 100 (the shape :func:`_held_out_counts` returns)."""
    radii = RADIUS_GRID[: len(kept_out)]
    return {radius: Counter(negatives_few_edits=100, negatives_few_edits_kept_out=k, paraphrases=100,
                            paraphrases_routed=r) for radius, k, r in zip(radii, kept_out, routed, strict=True)}


def test_a_paraphrase_radius_never_routes_fewer_unseen_wordings_than_the_plain_radius():
    plain_radius, _ = _choose_radius(_calibration([100, 100, 100, 99, 98], [10, 20, 30, 40, 50]), 0.99)
    assert plain_radius == RADIUS_GRID[3]  # the largest radius keeping 99% of the negatives out; it routes 40%
    plain = (plain_radius, 0.40)
    # Edits with paraphrases: one more negative slips in from the second radius on. Locality alone would cut
    # the radius to the first (20% routed); the floor keeps the smallest radius routing the plain 40%.
    dip = _calibration([100, 98, 98, 98, 97], [20, 35, 45, 55, 65])
    assert _choose_radius(dip, 0.99)[0] == RADIUS_GRID[0]
    radius, figures = _choose_radius(dip, 0.99, plain)
    assert (radius, figures["floor"], figures["paraphrases_routed"], figures["locality_negatives_few_edits"]) == (
        RADIUS_GRID[2], True, 0.45, 0.98)
    # Where locality already allows more reach, the floor changes nothing.
    radius, figures = _choose_radius(_calibration([100, 100, 100, 99, 98], [30, 50, 60, 70, 80]), 0.99, plain)
    assert (radius, figures["floor"]) == (RADIUS_GRID[3], False)
    # The floor never looks past the plain radius: paraphrases that route less everywhere keep locality's radius.
    radius, figures = _choose_radius(_calibration([100, 98, 98, 98, 98], [1, 2, 3, 4, 50]), 0.99, plain)
    assert (radius, figures["floor"]) == (RADIUS_GRID[0], False)


def test_training_refuses_what_it_cannot_learn_from():
    family = build("bert")
    editor = melo_fast.patch(family.model, tokenizer=family.tokenizer)
    with pytest.raises(ValueError, match="need 10 facts, 2 with paraphrases"):
        melo_fast.train_key_projection(editor, [Fact(("a question",))] * 12, progress=False)
    with pytest.raises(TypeError, match=r"facts\[3\] is str"):
        melo_fast.train_key_projection(editor, [*_facts()[:3], "a question"], progress=False)
    with pytest.raises(ValueError, match=r"the facts have 1 topic\(s\)"):
        melo_fast.train_key_projection(editor, [Fact(f.phrasings, topic="one") for f in _facts()], progress=False)
    editor.use_key_projection(_projection(editor.config.router, editor.router.key_width))
    with pytest.raises(ValueError, match="already routes through a key projection"):
        melo_fast.train_key_projection(editor, _facts(), progress=False)


def test_number_negatives_change_a_number_of_the_subject_only():
    assert neighbouring_numbers("177808") == ("177809", "17780")
    assert neighbouring_numbers("4") == ("5", "44") and neighbouring_numbers("19") == ("10", "1")
    wordings = ("What constellation is 43 Sagittarii part of?", "Where is 43 Sagittarii?",
                "Name the constellation of the star.", "In 1990, where was 43 Sagittarii?")
    # One per wording that names the subject; the change alternates; a number outside the subject stays.
    assert number_negatives(wordings, "43 Sagittarii") == [
        ("What constellation is 44 Sagittarii part of?", "44 Sagittarii"),
        ("Where is 4 Sagittarii?", "4 Sagittarii"),
        ("In 1990, where was 4 Sagittarii?", "4 Sagittarii"),
    ]
    # Subjects with two numbers change each in turn, by position (the "17" inside "1733" is another number).
    assert [t for _, t in number_negatives(("a 1733 b 17?", "x 1733 b 17", "y 1733 b 17"), "1733 b 17")] == [
        "1734 b 17", "1733 b 18", "173 b 17"]
    assert number_negatives(wordings, "Sagittarius") == number_negatives(wordings, None) == []
    assert number_negatives(("HD 5 or HD 6?",), "HD 5") == [("HD 6 or HD 6?", "HD 6")]
    assert number_negatives(("HD 5 star", "HD 6 star"), "HD 5") == []  # never one of the fact's own wordings


def _numbered_facts() -> list[Fact]:
    """The city facts, and twelve numbered stars in two wordings; star k's neighbour is star k + 1, asked in
    another wording than star k + 1's own, so it is a new question about a subject of the facts."""
    templates = (("Which constellation holds HD {}?", "HD {} lies in which constellation?"),
                 ("Name the constellation of HD {}.", "In what constellation is HD {}?"))
    stars = [Fact(tuple(t.format(k) for t in templates[k % 2]), (), f"HD {k}") for k in range(100, 112)]
    return _facts() + stars


def test_number_negatives_train_the_map_but_never_judge_its_radius(monkeypatch):
    family = build("bert")
    editor = melo_fast.patch(family.model, tokenizer=family.tokenizer)
    facts = _numbered_facts()
    folds = []
    fit = key_projection_training._fit

    def recording_fit(keys, trained, held, *rest):
        folds.append((trained, held))
        return fit(keys, trained, held, *rest)

    monkeypatch.setattr(key_projection_training, "_fit", recording_fit)
    projection = melo_fast.train_key_projection(editor, facts, rank=8, steps=20, check_every=10, progress=False)
    real = {t for f in facts for t in (*f.phrasings, *f.negatives)}
    subject_of = {t: f.topic for f in facts for t in f.phrasings}
    named = {q: topic for f in facts for q, topic in number_negatives(f.phrasings, f.topic) if q not in real}
    assert "Which constellation holds HD 101?" in named and len(named) >= 12
    assert projection.info["texts"] == len(real) + len(named) and projection.info["number_negatives"] >= len(named)
    texts = sorted(real | set(named))
    for trained, held in folds:
        held_subjects = {subject_of[texts[i]] for p, _ in held for i in p}
        added = [texts[i] for _, negatives in trained for i in negatives if texts[i] in named]
        assert added, "a fold trained without number negatives"
        # None names a subject held out in that fold, and none reaches the held-out facts that judge the radius.
        assert not {named[q] for q in added} & held_subjects
        assert any(named[q] in subject_of.values() for q in added)  # some do name another fact's subject
        assert all(texts[i] in real for _, negatives in held for i in negatives)
    folds.clear()
    plain = melo_fast.train_key_projection(editor, facts, rank=8, steps=20, check_every=10, progress=False,
                                           number_negatives=False)
    assert plain.info["number_negatives"] == 0 and plain.info["texts"] == len(real)
    assert len(folds) == 5 and all(not negatives for trained, _ in folds for p, negatives in trained if len(p) == 2
                                   and "HD" in sorted(real)[p[0]])


# --- facts from KnowEdit records -------------------------------------------------------------------
def _record(prompt, subject, truth, rephrase, generate, locality):
    return EditRecord(
        index=0, prompt=prompt, target_new="x", ground_truth=[truth], rephrase_prompt=rephrase, subject=subject,
        locality={"Relation_Specificity": [Probe(p, [a]) for p, a in locality]}, generate_prompts=generate,
    )


def test_records_of_one_fact_merge_and_their_same_fact_questions_are_not_negatives():
    records = [
        _record("Who founded Acme?", "Acme", "Ann", "Acme was founded by", [".", "Acme's founder is"],
                [("Where is Acme based?", "Oslo"), ("The founder of Acme is", "Ann")]),
        _record("Acme was started by whom?", "Acme", "ann ", "Who started Acme?", [], []),
        _record("What does Acme make?", "Acme", "anvils", "Acme manufactures", [], []),
    ]
    facts = facts_from_records(records)
    assert facts[0] == Fact(
        ("Who founded Acme?", "Acme was founded by", "Acme's founder is", "Acme was started by whom?",
         "Who started Acme?"),
        ("Where is Acme based?",),  # "The founder of Acme is" asks the same fact: not a negative
        "Acme",
    )
    assert facts[1] == Fact(("What does Acme make?", "Acme manufactures"), (), "Acme")
    records[2] = _record("Where is Acme based?", "Acme", "Oslo", "Acme is based in", [], [])
    assert facts_from_records(records)[0].negatives == ()  # now it asks a fact of the records


# --- the evaluation commands -----------------------------------------------------------------------
def test_eval_routes_through_a_key_projection_file_and_records_it(tmp_path):
    from melo_fast.cli import main
    from tests.test_eval import tiny_records, write

    family = build("gpt2")
    family.model.save_pretrained(tmp_path / "gpt2")
    family.tokenizer.save_pretrained(tmp_path / "gpt2")
    editor = melo_fast.patch(family.model)
    router, width = editor.config.router, editor.router.key_width
    melo_fast.unpatch(family.model)
    # A small radius: a random map of a random model's keys leaves similar prompts close together.
    _projection(router, width, radius=0.01, key_position="mean").save(tmp_path / "p.safetensors")
    data = write(tmp_path, tiny_records(["zero", "one"], lambda i: ["red", "blue", "green"][i % 3], n=4))
    main(["eval", "--model", str(tmp_path / "gpt2"), "--data", str(data), "--batch-size", "2", "--num-iter", "2",
          "--methods", "unedited,melo", "--key-projection", str(tmp_path / "p.safetensors"), "--out",
          str(tmp_path / "out"), "--no-progress"])
    melo = json.loads((tmp_path / "out" / "eval_report.json").read_text())["methods"]["melo"]
    assert melo["key_projection"]["router"] == router
    assert melo["config"]["key_position"] == "mean"  # the projection's key function
    assert melo["init_radius"] == 0.01  # its radius
    with pytest.raises(SystemExit, match="--key-projection: melo_fast: no key projection file"):
        main(["eval", "--model", str(tmp_path / "gpt2"), "--data", str(data), "--key-projection",
              str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "out2")])


def test_the_demo_refuses_a_sweep_with_a_key_projection(tmp_path):
    from melo_fast.cli import main

    with pytest.raises(SystemExit, match="--sweep replays routing by the router's raw keys"):
        main(["demo", "--model", "minilm", "--sweep", "--key-projection", str(tmp_path / "p.safetensors")])


def test_a_compiled_model_routes_through_the_projection_as_eager_does():
    """torch.compile(fullgraph=True) traces the projected key path: no graph break, the eager outputs."""
    torch._dynamo.reset()
    family, editor, _ = _gpt2_with_projection(num_iter=5, init_radius=0.05)
    editor.edit_texts([PROMPT], [TARGET], family.tokenizer)
    family.model.loss_type = "ForCausalLM"  # transformers' loss-type warning is not traceable
    compiled = torch.compile(family.model, fullgraph=True, backend="aot_eager")
    inputs = family.tokenizer([PROMPT, "Dogs bark loudly at the moon"], return_tensors="pt", padding=True)
    assert editor.route(inputs).tolist() == [0, -1]
    try:
        with torch.no_grad():
            assert torch.equal(compiled(**inputs).logits, family.model(**inputs).logits)
    finally:
        torch._dynamo.reset()
