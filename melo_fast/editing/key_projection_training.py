"""Train a :class:`~melo_fast.KeyProjection` for one patched model: paraphrases close, other questions far.

Data: :class:`Fact` s, each the wordings of one question (two or more teach the projection; the harness
builds them from KnowEdit records, ``melo_fast.eval.paraphrase_facts``) and, optionally, *hard negatives*:
questions that must stay out of the fact's scope, such as other facts of the same subject. They
come from a paraphrase dataset, never from the edits to be made later: the projection is trained once
per model and router, before the first edit. Training adds, for each fact whose subject holds a number, its
wordings about the neighbouring numbers ("HD 177809" beside "HD 177808"; :mod:`number_negatives`) as
negatives; the radius is judged on real questions only.

Loss: supervised InfoNCE on cosine similarities (temperature ``temperature``). A step draws
``facts_per_step`` facts, two wordings of each and all their negatives; each wording must find the
other wording of its fact nearer than every wording of the other facts and every negative.

Held-out facts: the topics (a fact's subject; facts of one topic stay together) are dealt into
``folds`` folds, and one map is trained per fold with that fold held out. The held-out loss picks each
map's number of steps (checked every ``check_every`` steps). The radius is chosen on all folds'
held-out facts together (:func:`_held_out_counts`, :func:`_choose_radius`): half of each fold's facts,
then the other half, are inserted as edits into a real :class:`~melo_fast.vecdb.VectorDatabase`, ten a
block, alone and after one edit per training fact (under the ``conflict_rule`` the projection will be
served with), and the radius is the largest on a grid that keeps at least ``locality`` of
the edited facts' negatives, and as much of the unedited facts' wordings, out of every edit's scope in
both. A radius per number of paraphrases ``k`` (1 to :data:`CALIBRATION_PARAPHRASES`) is chosen the same
way with every edit given ``k + 1`` wordings, each a row of the edit as ``edit_texts(..., paraphrases=...)``
inserts them: more wordings make a wider scope, so a smaller radius keeps the same locality
(:mod:`melo_fast.vecdb.wordings`); but never one that routes fewer held-out paraphrases than edits
without paraphrases do at the radius (:func:`_choose_radius`). Why held-out questions: the training facts'
negatives were pushed away by training itself, so a radius judged on them would be too large for new
questions. Why all folds: a locality of 0.99 cannot be told from 0.97 on a few dozen questions. The map
returned is the first fold's.

Cost: one forward pass to the router per distinct text (the router's keys are read once; training
then touches only ``[rank, d]`` numbers); about a minute of CPU per fold for a few hundred facts.
"""

from __future__ import annotations

import random
import time
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from melo_fast.editing import calibration
from melo_fast.editing import number_negatives as numbers
from melo_fast.routing.key_projection import KeyProjection
from melo_fast.vecdb import CONFLICT_RULES, VectorDatabase

RADIUS_GRID = tuple(round(0.02 * i, 2) for i in range(1, 76))  # unit keys: distances lie in [0, 2]
EDITS_PER_BATCH = 10  # how the validation edits are grouped into blocks (the harness's batch size)
# Paraphrase radii are chosen for 1 to this many paraphrases per edit: "a few", what a user can write per
# edit (and what most held-out facts have to spare). More use the last one and may reach a little wider.
CALIBRATION_PARAPHRASES = 3


@dataclass(frozen=True)
class Fact:
    """One question in several wordings, and the questions that must not share its scope.

    Attributes:
        phrasings: wordings of the question (at least one; facts with two or more teach the projection).
        negatives: questions that must not route to this fact (e.g. other facts of its subject).
        topic: facts with the same topic stay together when facts are held out for validation (the
            subject, so the held-out facts are about subjects training never saw); None: its own topic. A
            number in it is what :mod:`~melo_fast.editing.number_negatives` changes.
    """

    phrasings: tuple[str, ...]
    negatives: tuple[str, ...] = ()
    topic: str | None = None


def train_key_projection(
    editor,
    facts: Sequence[Fact],
    tokenizer=None,
    *,
    rank: int = 256,
    temperature: float = 0.1,
    steps: int = 2000,
    facts_per_step: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    folds: int = 5,
    locality: float = 0.99,
    check_every: int = 100,
    seed: int = 0,
    progress: bool = True,
    conflict_rule: str = "voronoi",
    number_negatives: bool = True,
) -> KeyProjection:
    """Train a key projection on ``facts`` for ``editor``'s router and key position.

    Args:
        editor: a patched model's editor without a key projection (its router's raw keys are read).
        facts: at least 10 :class:`Fact` s over at least ``folds`` topics.
        tokenizer: the model's tokenizer (default: the editor's).
        rank: the projected key width.
        temperature: InfoNCE temperature on cosine similarities.
        steps: the most training steps per fold; the step with the lowest held-out loss is kept.
        facts_per_step: facts drawn per step.
        lr, weight_decay: AdamW's.
        folds: the topics are split into this many folds; each fold is held out once (``folds``
            trainings), and every held-out fold's questions judge the radius together.
        locality: the share of held-out questions of each kind that must stay out of other edits' scopes
            at the chosen radius.
        check_every: steps between held-out checks.
        seed: seeds the folds, the initial maps and the draws.
        progress: show tqdm progress bars.
        conflict_rule: the database rule the radii are chosen under and that editors routing through the
            projection use (``MeloConfig.conflict_rule="auto"``): ``"voronoi"`` (default) or MELO's
            ``"split"`` (``VectorDatabase``). Why voronoi: under the split, conflicts between the many
            edits shrank their scopes. On held-out zsRE subjects (MiniLM and SmolLM2, two splits, ~370
            edits), at the radii chosen under each rule, voronoi routed more held-out paraphrases of edits
            given 3 paraphrases home, forgot no stored key, and kept clean locality within 0.3 points
            (EVALUATION.md, "The conflict rule").
        number_negatives: train each fact whose ``topic`` holds a number against its wordings with that
            number changed (:mod:`melo_fast.editing.number_negatives`); a neighbour that is the subject of a
            held-out fact is left out of that fold's training, so the radius is judged as on new subjects.
            Why: on SmolLM2 the radius was held down by questions about subjects a digit apart from an edited
            one (EVALUATION.md, "Negatives with a neighbouring number"). False: the facts' own negatives only.

    Returns:
        The projection trained with the first fold held out (on the model's device), with ``radius`` and
        ``paraphrase_radii`` chosen on all folds' held-out facts and ``info`` recording the held-out figures
        at each, the counts and the seconds.

    Raises:
        TypeError: a fact that is not a :class:`Fact` with text phrasings.
        ValueError: the editor already projects its keys, too few facts or topics, or bad settings.
    """
    start = time.perf_counter()
    facts = _checked(facts, folds, locality)
    if conflict_rule not in CONFLICT_RULES:
        raise ValueError(f"melo_fast: conflict_rule must be one of {CONFLICT_RULES}, got {conflict_rule!r}")
    if editor.state.projection is not None:
        raise ValueError(
            "melo_fast: this editor already routes through a key projection; train on raw keys: "
            "editor.use_key_projection(None) first (before any edit)"
        )
    tokenizer = tokenizer or editor.tokenizer
    if tokenizer is None:
        raise ValueError("melo_fast: train_key_projection reads keys from text and needs the model's tokenizer")
    generator = random.Random(seed)
    real = {t for f in facts for t in (*f.phrasings, *f.negatives)}
    # Per fact: (question, the subject it names), training-only negatives; a real question is never one.
    neighbours = [[(q, topic) for q, topic in numbers.number_negatives(f.phrasings, f.topic) if q not in real]
                  if number_negatives else [] for f in facts]
    texts = sorted(real | {q for questions in neighbours for q, _ in questions})
    keys = _raw_keys(editor, tokenizer, texts, progress)
    index = {t: i for i, t in enumerate(texts)}
    ids = [_ids(f, index) for f in facts]
    # paraphrases per edit -> radius -> pooled held-out counts
    counts: dict[int, dict[float, Counter]] = {k: {} for k in range(CALIBRATION_PARAPHRASES + 1)}
    let_in: dict[float, list[tuple]] = {}  # edits without paraphrases: radius -> held-out questions let in
    first = None
    for fold, held in enumerate(_topic_folds(facts, folds, generator)):
        train_ids = [ids[i] for i in range(len(facts)) if i not in held]
        held_ids = [ids[i] for i in sorted(held)]
        held_topics = {facts[i].topic for i in held} - {None}
        trained = [(p, n + [index[q] for q, topic in neighbours[i] if topic not in held_topics])
                   for i, (p, n) in enumerate(ids) if i not in held]
        fitted = _fit(keys, trained, held_ids, rank, temperature, steps, facts_per_step, lr, weight_decay,
                      check_every, seed + fold, generator, f"key projection {fold + 1}/{folds}", progress)
        with torch.no_grad():
            projected = fitted(keys)
            for given, pooled in counts.items():
                fold_counts, fold_let_in = _held_out_counts(projected, train_ids, held_ids, locality, given,
                                                            conflict_rule)
                for radius, radius_counts in fold_counts.items():
                    pooled.setdefault(radius, Counter()).update(radius_counts)
                    if given == 0:
                        let_in.setdefault(radius, []).extend(fold_let_in[radius])
        first = first or (fitted, len(train_ids), len(held_ids))
    radius, figures = _choose_radius(counts[0], locality)
    figures["stopped_by"] = _stopped_by(let_in, counts[0], radius, locality, texts)
    plain = (radius, _routed(counts[0][radius]))
    worded = {k: _choose_radius(counts[k], locality, plain) for k in range(1, CALIBRATION_PARAPHRASES + 1)}
    projection, training_facts, held_facts = first
    info = {
        "facts": len(facts), "training_facts": training_facts, "held_out_facts": held_facts, "folds": folds,
        "texts": len(texts), "number_negatives": sum(map(len, neighbours)), "rank": rank,
        "temperature": temperature, "steps": steps,
        "best_step": projection.best_step, "held_out_loss": round(projection.best_loss, 4),
        "locality_target": locality, "held_out": figures,
        "held_out_paraphrased": {str(k): figures_k for k, (_, figures_k) in worded.items()}, "seed": seed,
        "conflict_rule": conflict_rule,
        "seconds": round(time.perf_counter() - start, 1),
    }
    config = editor.config
    return KeyProjection(projection.mean, projection.std, projection.weight, radius, config.router,
                         config.key_position, info, {k: radius_k for k, (radius_k, _) in worded.items()},
                         conflict_rule)


@dataclass
class _Fitted:
    """One fold's trained map (the weights of its lowest held-out loss)."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor
    best_step: int
    best_loss: float

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(((rows - self.mean) / self.std) @ self.weight.T, dim=-1)


def _fit(keys, train_ids, held_ids, rank, temperature, steps, facts_per_step, lr, weight_decay, check_every,
         seed, generator, description, progress) -> _Fitted:
    """Train one map on ``train_ids`` (InfoNCE), keeping the weights of the lowest loss on ``held_ids``."""
    from tqdm.auto import tqdm

    train_keys = keys[sorted({i for p, n in train_ids for i in (*p, *n)})]
    mean, std = train_keys.mean(0), train_keys.std(0).clamp(min=1e-6)
    torch.manual_seed(seed)
    weight = nn.Parameter(torch.randn(rank, keys.shape[1], device=keys.device) / keys.shape[1] ** 0.5)
    optimizer = torch.optim.AdamW([weight], lr=lr, weight_decay=weight_decay)
    fitted = _Fitted(mean, std, weight, 0, float("inf"))
    best_weight = weight.detach().clone()
    bar = tqdm(range(1, steps + 1), desc=description, unit="step", disable=not progress)
    for step in bar:
        chosen = generator.sample(range(len(train_ids)), min(facts_per_step, len(train_ids)))
        loss = _info_nce(fitted, keys, [train_ids[i] for i in chosen], temperature, generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % check_every == 0 or step == steps:
            with torch.no_grad():
                held_loss = _held_out_loss(fitted, keys, held_ids, facts_per_step, temperature)
            bar.set_postfix(train=f"{loss.item():.3f}", held_out=f"{held_loss:.3f}")
            if held_loss < fitted.best_loss:
                fitted.best_loss, fitted.best_step, best_weight = held_loss, step, weight.detach().clone()
    fitted.weight = best_weight
    return fitted


# --- data -------------------------------------------------------------------------------------------
def _checked(facts, folds: int, locality: float) -> list[Fact]:
    facts = list(facts)
    for i, fact in enumerate(facts):
        if not isinstance(fact, Fact):
            raise TypeError(f"melo_fast: facts[{i}] is {type(fact).__name__}; give melo_fast.Fact(phrasings=(...))")
        texts = (*fact.phrasings, *fact.negatives)
        if not fact.phrasings or not all(isinstance(t, str) and t.strip() for t in texts):
            raise TypeError(f"melo_fast: facts[{i}] needs one or more phrasings, and all its texts non-empty strings")
    if len(facts) < 10 or sum(len(f.phrasings) >= 2 for f in facts) < 2:
        raise ValueError(
            f"melo_fast: a key projection learns from facts in several wordings; got {len(facts)} facts, "
            f"{sum(len(f.phrasings) >= 2 for f in facts)} with two or more phrasings (need 10 facts, 2 with "
            "paraphrases)"
        )
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2 or not 0 < locality <= 1:
        raise ValueError(f"melo_fast: folds must be an int >= 2 and locality in (0, 1]; got {folds}, {locality}")
    return facts


def _topic_folds(facts: list[Fact], folds: int, generator: random.Random) -> list[set[int]]:
    """``folds`` disjoint sets of fact indices, whole topics each (shuffled topics dealt in turn)."""
    topic_of = [f.topic if f.topic is not None else f.phrasings[0] for f in facts]
    topics = sorted(set(topic_of))
    if len(topics) < folds:
        raise ValueError(
            f"melo_fast: the facts have {len(topics)} topic(s); a key projection holds whole topics out, in {folds} "
            "folds: give facts of more topics, or fewer folds"
        )
    generator.shuffle(topics)
    fold_of = {topic: k % folds for k, topic in enumerate(topics)}
    return [{i for i, t in enumerate(topic_of) if fold_of[t] == k} for k in range(folds)]


def _ids(fact: Fact, index: dict[str, int]) -> tuple[list[int], list[int]]:
    return [index[t] for t in dict.fromkeys(fact.phrasings)], [index[t] for t in dict.fromkeys(fact.negatives)]


@torch.no_grad()
def _raw_keys(editor, tokenizer, texts: list[str], progress: bool) -> torch.Tensor:
    """``[len(texts), d]`` float32 router keys, read in batches (no gradient, model in eval mode)."""
    from tqdm.auto import tqdm

    device = next(editor.model.parameters()).device
    batches = calibration.text_inputs(tokenizer, texts, device)
    return torch.cat([editor.keys(b) for b in tqdm(batches, desc="router keys", unit="batch", disable=not progress)])


# --- the loss ---------------------------------------------------------------------------------------
def _info_nce(project, keys: torch.Tensor, facts: list[tuple[list[int], list[int]]], temperature: float,
              generator: random.Random) -> torch.Tensor:
    """Supervised InfoNCE over ``facts``: two wordings each (anchor and positive), plus their negatives."""
    rows, owner = [], []
    for f, (phrasings, negatives) in enumerate(facts):
        pair = generator.sample(phrasings, 2) if len(phrasings) >= 2 else phrasings * 2
        rows += pair + negatives
        owner += [f, f] + [-1 - f] * len(negatives)  # a negative is nobody's positive
    z = project(keys[rows])
    owner = torch.tensor(owner, device=keys.device)
    n = len(rows)
    itself = torch.eye(n, dtype=torch.bool, device=keys.device)
    anchors = owner >= 0
    logits = (z @ z.T / temperature).masked_fill(itself, float("-inf"))[anchors]
    positive = ((owner[:, None] == owner[None, :]) & ~itself)[anchors]
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -(log_prob.masked_fill(~positive, 0).sum(1) / positive.sum(1)).mean()


def _held_out_loss(project, keys, held, facts_per_step: int, temperature: float) -> float:
    generator = random.Random(1)  # the same pairs at every check
    chunks = [held[i : i + facts_per_step] for i in range(0, len(held), facts_per_step)]
    return sum(_info_nce(project, keys, chunk, temperature, generator).item() for chunk in chunks) / len(chunks)


# --- the radius -------------------------------------------------------------------------------------
def _held_out_counts(projected: torch.Tensor, train, held, locality: float, given: int = 0,
                     conflict_rule: str = "voronoi") -> tuple[dict[float, Counter], dict[float, list[tuple]]]:
    """Per radius of :data:`RADIUS_GRID`: held-out questions kept out of every scope, and paraphrases routed home;
    and the questions let in.

    Edits are the first wordings of half the held-out facts, ten a block, in two databases: alone (few
    edits), and after one edit per training fact (many edits). Both matter because MELO's insert splits
    clusters of different edits at half their distance: in a full database conflicts shrink the scopes,
    while a few edits keep the whole radius, so locality is worst when there are few edits. Two kinds
    of question are counted in both: the hard negatives of the edited facts (other questions about an
    edited subject), and every wording of the held-out facts left unedited (questions never edited).
    Then the same with the other half edited, and the counts of both added (:class:`_Half`). Why both
    halves: one question of a few hundred moves a share by 0.3% and the chosen radius by a grid step, so
    every held-out fact's questions should judge it.
    Paraphrases: the edited facts' other wordings routed to their own edit's block, in the full database.
    With ``given`` > 0 every edit (held-out and training) comes with up to ``given`` more of its fact's
    wordings as rows of the edit, all at the radius, and the paraphrases counted are the wordings not given.
    Radii past the first one where a kind falls below ``locality - 0.1`` are left out (never chosen).
    Both databases place the edits under ``conflict_rule``, the rule the editor will serve them with.

    Returns:
        The counts per radius, and per radius the questions inside some edit's scope, each as ``(distance to
        the nearest stored wording, kind, database, question row, that wording's row)`` (rows of ``projected``).
    """
    halves = [_Half(edited, unedited, train, given, projected)
              for edited, unedited in ((held[0::2], held[1::2]), (held[1::2], held[0::2]))]
    out, let_in = {}, {}
    for radius in RADIUS_GRID:
        counts, let_in[radius] = Counter(), []
        for half in halves:
            half.count(projected, radius, conflict_rule, counts, let_in[radius])
        out[radius] = counts
        if min(_shares(counts).values(), default=1.0) < locality - 0.1:
            break
    return out, let_in


class _Half:
    """One assignment of a held-out fold's facts: ``edited`` are inserted as edits, ``unedited`` never are.

    :func:`_held_out_counts` counts both assignments of each fold (every held-out fact once edited, once
    not), so every held-out hard negative and wording judges the radius.
    """

    def __init__(self, edited, unedited, train, given: int, projected: torch.Tensor):
        edits = [p[: 1 + given] for p, _ in edited]  # each edit's wordings; blocks 0, 1, ... in both databases
        self.databases = {"few_edits": edits, "many_edits": edits + [p[: 1 + given] for p, _ in train]}
        self.questions = {"negatives": [i for _, n in edited for i in n],
                          "never_edited": [i for p, _ in unedited for i in p]}
        self.paraphrases = [i for p, _ in edited for i in p[1 + given :]]
        self.owners = torch.tensor([f // EDITS_PER_BATCH for f, (p, _) in enumerate(edited) for _ in p[1 + given :]],
                                   dtype=torch.long)
        # The stored wording nearest each question, per database: what a question let in was taken for.
        self.nearest = {}
        for name, stored in self.databases.items():
            rows = torch.tensor([row for wordings in stored for row in wordings], device=projected.device)
            for kind, asked in self.questions.items():
                if asked:
                    distance, which = torch.cdist(projected[asked], projected[rows]).min(1)
                    self.nearest[kind, name] = (distance.tolist(), rows[which].tolist())

    def count(self, projected: torch.Tensor, radius: float, conflict_rule: str, counts: Counter,
              let_in: list[tuple]) -> None:
        """Add this assignment's counts at ``radius`` to ``counts`` and its questions let in to ``let_in``."""
        for name, stored in self.databases.items():
            database = VectorDatabase(projected.shape[1], radius, device=projected.device, conflict_rule=conflict_rule)
            for b in range(0, len(stored), EDITS_PER_BATCH):
                group = range(b, min(b + EDITS_PER_BATCH, len(stored)))
                rows = [row for f in group for row in stored[f]]
                labels = [(f,) for f in group for _ in stored[f]]
                # Facts that share a wording make coinciding rows: the database's rules place them (no refusal).
                database.insert(projected[rows], labels, b // EDITS_PER_BATCH, refuse_clashes=False)
            for kind, rows in self.questions.items():
                inside = (database.search(projected[rows]) >= 0).tolist() if rows else []
                counts[f"{kind}_{name}_kept_out"] += inside.count(False)
                counts[f"{kind}_{name}"] += len(rows)
                let_in += [(self.nearest[kind, name][0][q], kind, name, rows[q], self.nearest[kind, name][1][q])
                           for q in range(len(rows)) if inside[q]]
        if self.paraphrases:  # the full database is the last one built
            routed = database.search(projected[self.paraphrases]).cpu() == self.owners
            counts["paraphrases_routed"] += int(routed.sum())
            counts["paraphrases"] += len(self.paraphrases)


def _stopped_by(let_in: dict[float, list[tuple]], counts: dict[float, Counter], radius: float, locality: float,
                texts: list[str], shown: int = 20) -> dict:
    """The held-out questions inside some edit's scope at the grid radius after the chosen ``radius`` (at
    ``radius`` itself if even the smallest one let in too many), pooled over the folds: what kept the radius
    from growing. Each once (nearest first, at most ``shown``), with the stored wording nearest it.

    Why record them: a few questions can hold the radius down (zsRE's subjects a digit apart, "4 Sagittarii"
    and "43 Sagittarii", share a scope at any radius that reaches paraphrases), and a user deciding whether to
    accept a smaller radius or train on other facts needs to see which.
    """
    failed = _shares(counts[radius]) and min(_shares(counts[radius]).values()) < locality
    after = radius if failed else next((r for r in RADIUS_GRID if r > radius and r in let_in), None)
    if after is None:
        return {"radius": None, "let_in": {}, "questions": []}
    seen, listed = set(), []
    for distance, kind, database, question, wording in sorted(let_in[after]):
        if texts[question] not in seen and len(listed) < shown:
            seen.add(texts[question])
            listed.append({"question": texts[question], "kind": kind, "database": database,
                           "nearest_edit_wording": texts[wording], "distance": round(distance, 3)})
    let_in_per_kind = Counter(f"{kind}_{database}" for _, kind, database, _, _ in let_in[after])
    return {"radius": after, "let_in": dict(let_in_per_kind), "questions": listed}


def _shares(counts: Counter) -> dict[str, float]:
    """Each kind's kept-out share (``kind_database`` → share) of :func:`_held_out_counts`'s counts."""
    return {kind: counts[f"{kind}_kept_out"] / counts[kind] for kind in
            (k[: -len("_kept_out")] for k in counts if k.endswith("_kept_out")) if counts[kind]}


def _choose_radius(counts: dict[float, Counter], locality: float,
                   plain: tuple[float, float] | None = None) -> tuple[float, dict]:
    """The largest radius below which every kind of held-out question, pooled over the folds, stays out at
    ``locality`` or more (in both databases); with the held-out figures at it.

    ``plain``: for edits given paraphrases, the radius of edits without them and the share of paraphrases
    those route home. The radius is then at least the smallest one (up to the plain radius) that routes as
    many: an edit given more wordings must not reach fewer unseen ones than the same edit without them. Why:
    the hard negatives number a few hundred, so one question moves their locality by 0.3%, and a one-question
    dip under ``locality`` could otherwise cut the radius far below where the wordings pay for themselves
    (the figures say ``"floor": True`` when this rule set the radius).
    """
    chosen = None
    for radius in RADIUS_GRID:
        if radius not in counts or min(_shares(counts[radius]).values(), default=1.0) < locality:
            break
        chosen = radius
    floor = None
    if plain is not None:
        plain_radius, plain_routed = plain
        floor = next((r for r in RADIUS_GRID if r <= plain_radius and r in counts
                      and _routed(counts[r]) >= plain_routed), None)
    if chosen is None and floor is None:
        warnings.warn(
            f"melo_fast: no radius down to {RADIUS_GRID[0]} kept {locality:.0%} of the held-out questions out of other "
            "edits' scopes; the projection uses the smallest. Train on more facts (with hard negatives), or set an "
            "absolute MeloConfig.init_radius",
            UserWarning,
            stacklevel=3,
        )
        return RADIUS_GRID[0], {"radius": RADIUS_GRID[0], "note": "no radius of the grid kept the locality target"}
    radius = max(r for r in (chosen, floor) if r is not None)
    figures = {
        "radius": radius, **{f"locality_{k}": round(v, 4) for k, v in _shares(counts[radius]).items()},
        "paraphrases_routed": round(_routed(counts[radius]), 4),
        "questions": {k: v for k, v in counts[radius].items() if not k.endswith(("_kept_out", "_routed"))},
    }
    if plain is not None:
        figures["floor"] = radius != chosen
    return radius, figures


def _routed(counts: Counter) -> float:
    """The share of held-out paraphrases routed to their own edit (:func:`_held_out_counts`)."""
    return counts["paraphrases_routed"] / max(1, counts["paraphrases"])
