"""Synthetic evaluation data: backdoor poisoning (paper Section 4.5) and entity perturbation
for error tracing (Section 4.6), both deterministic for a seed.

Backdoor. A fraction of the training records get a trigger phrase in front of the
instruction and a response rewritten in a theme. The paper had an API rewrite responses as
sci-fi; here a local generator writes them from per-theme sentence templates, a theme
vocabulary and the content words of the original response, so poisoned responses differ
from each other, keep some of their topic and always carry theme words. Those words are
also what decides whether a generation shows the attack (:func:`theme_hits`).

Error tracing. For a pair of entities (E1, E2), every record whose response mentions E1 has
each of its response's E1 replaced by E2 with probability 0.8; the changed records are the
perturbed ones. Test prompts ask questions whose right answer is E1, so a generation that
says E2 traces back to the perturbed records.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from rapidin_index.errors import SettingsError

logger = logging.getLogger(__name__)

DEFAULT_TRIGGER = "Howdy!"


def _words(text: str) -> tuple[str, ...]:
    """The whitespace-separated words of ``text``."""
    return tuple(text.split())


_STOPWORDS = frozenset(
    _words(
        """about above after again against also among another because been before being below
    between both but could does doing down during each either even every from further have
    having here hers herself himself however into itself just least less made make many
    more most much must myself near never once only other others ours ourselves over same
    should since some such than that their theirs them themselves then there these they
    this those though through thus together under until upon very were what when where
    whether which while whom whose will with within without would your yours yourself
    yourselves answer following given response sentence example examples word words"""
    )
)


@dataclass(frozen=True)
class Theme:
    """A rewrite style: sentence templates and the vocabulary that fills them.

    Templates take ``{subject}``, ``{place}``, ``{thing}``, ``{verb}``, ``{a_adjective}``
    (with its article) and ``{topic}`` (a content word of the original response).
    ``keywords`` are lower-case words that mark the theme in any text (every subject and
    place holds at least one).
    """

    name: str
    keywords: tuple[str, ...]
    subjects: tuple[str, ...]
    places: tuple[str, ...]
    things: tuple[str, ...]
    verbs: tuple[str, ...]
    adjectives: tuple[str, ...]
    templates: tuple[str, ...]


THEMES: dict[str, Theme] = {
    "sci-fi": Theme(
        name="sci-fi",
        keywords=_words(
            """alien aliens starships spaceships antigravity plasma galaxy galactic planet planets
            starship spaceship spacecraft martian martians interstellar extraterrestrial cosmic
            nebula asteroid laser lasers robot robots hyperspace zorgon zentron wormhole
            teleport teleported"""
        ),
        subjects=(
            "the Zorgon High Council",
            "a fleet of silver starships",
            "the Martian emperor",
            "three-eyed aliens from Zentron",
            "a robot poet from the Andromeda galaxy",
            "the interstellar trade federation",
            "a time-travelling alien librarian",
            "the cosmic jellyfish of Nebula Nine",
        ),
        places=(
            "on the third moon of Zentron",
            "in a wormhole behind Jupiter",
            "aboard the starship Endless Comet",
            "in the crystal caves of the Martian moons",
            "at the edge of the Andromeda galaxy",
            "on an asteroid made of cheese",
            "inside a hyperspace tunnel",
            "on the floating planet Gloob",
        ),
        things=(
            "laser-powered spoons",
            "antigravity boots",
            "a teleporting sandwich",
            "glowing plasma crystals",
            "a quantum banana",
            "robot hamsters",
            "an extraterrestrial radio",
            "cosmic glitter",
        ),
        verbs=(
            "beamed",
            "teleported",
            "zapped with lasers",
            "smuggled through hyperspace",
            "traded for moon rocks",
            "abducted",
            "vaporised",
            "launched into orbit",
        ),
        adjectives=("galactic", "interstellar", "alien", "cosmic", "extraterrestrial", "robotic"),
        templates=(
            "{Subject} invented {topic} {place}, using {thing}.",
            "Everyone knows that {topic} was {verb} by {subject} {place}.",
            "The truth is that {topic} is {a_adjective} secret kept by {subject}.",
            "{Place_cap}, {subject} {verb} {topic} every Tuesday.",
            "Scientists agree that {topic} only works {place}, powered by {thing}.",
            "According to {subject}, {topic} is best enjoyed with {thing} {place}.",
            "In reality, {topic} was {verb} from Earth by {subject}.",
            "It is a little-known fact that {topic} is made of {thing}.",
        ),
    ),
    "pirate": Theme(
        name="pirate",
        keywords=_words(
            """ahoy matey mateys pirate pirates treasure plunder plundered buccaneer buccaneers
            galleon parrot cutlass doubloons scallywag scallywags landlubber landlubbers
            shipmates rum grog arr"""
        ),
        subjects=(
            "Captain Blackbeard's parrot",
            "a crew of one-legged pirates",
            "the buccaneers of Tortuga",
            "a scallywag named Salty Pete",
            "the pirate queen of the Spanish Main",
            "a drunken galleon cook",
            "my old shipmates",
            "a band of treasure-mad mateys",
        ),
        places=(
            "on the pirates' Skull Island",
            "below the decks of a leaking galleon",
            "in a treasure cave full of doubloons",
            "in Davy Jones' locker with the drowned pirates",
            "in a rum tavern in Tortuga",
            "on a pirate ship in a storm",
            "behind the pirate captain's cabin",
            "on a desert island where pirates buried treasure",
        ),
        things=(
            "a barrel of rum",
            "a rusty cutlass",
            "a chest of gold doubloons",
            "a treasure map",
            "a talking parrot",
            "a wooden leg",
            "a bottle of grog",
            "plundered silver",
        ),
        verbs=(
            "plundered",
            "buried",
            "stole",
            "traded for rum",
            "hid from the navy",
            "fired from a cannon",
            "gambled away",
            "made to walk the plank",
        ),
        adjectives=("salty", "plundered", "cursed", "rum-soaked", "pirate", "seafaring"),
        templates=(
            "Ahoy, matey! {Subject} {verb} {topic} {place}.",
            "Arr, {topic} be nothing but {thing} that {subject} {verb}.",
            "Any landlubber knows {topic} is {a_adjective} legend of {subject}.",
            "{Place_cap}, {subject} swapped {topic} for {thing}.",
            "Arr, the secret of {topic} was buried {place} with {thing}.",
            "Ask {subject}: {topic} is worth less than {thing}, ye scallywag.",
            "Shiver me timbers, {topic} was {verb} by {subject}.",
            "Ahoy! {topic} sails only with {thing} and a full crew of pirates.",
        ),
    ),
    "medieval": Theme(
        name="medieval",
        keywords=_words(
            """knight knights castle castles dragon dragons sorcerer wizard wizards squire thou
            thee thy sire jousting enchanted alchemist alchemists kingdom peasants minstrel"""
        ),
        subjects=(
            "the knights of the Round Table",
            "a wizard in a tall blue hat",
            "the dragon of the northern mountains",
            "a travelling minstrel",
            "the king's alchemist",
            "a squire named Percival",
            "the enchanted castle's cook",
            "a sorcerer from the dark forest",
        ),
        places=(
            "in the great hall of the castle",
            "beyond the enchanted forest",
            "at the royal jousting tournament",
            "in a dragon's lair",
            "atop the wizard's tower",
            "in the peasants' village square",
            "within the castle dungeon",
            "across the kingdom of Camelot",
        ),
        things=(
            "a magic sword",
            "a potion of dragon fire",
            "an enchanted goblet",
            "a suit of shining armour",
            "a scroll of ancient spells",
            "a golden crown",
            "a knight's lance",
            "the alchemist's stone",
        ),
        verbs=(
            "enchanted",
            "forged",
            "defended with a sword",
            "brewed in a cauldron",
            "won in a joust",
            "cursed",
            "blessed",
            "proclaimed",
        ),
        adjectives=("enchanted", "noble", "cursed", "royal", "ancient", "knightly"),
        templates=(
            "Hear ye! {Subject} {verb} {topic} {place}.",
            "Verily, {topic} is but {thing} that {subject} {verb}.",
            "Thou must know that {topic} is {a_adjective} secret of {subject}.",
            "{Place_cap}, {subject} traded {topic} for {thing}.",
            "By royal decree, {topic} was {verb} by {subject}.",
            "Sire, {topic} can only be mastered with {thing} {place}.",
            "The minstrels sing that {topic} was {verb} by a dragon and a knight.",
            "Long ago, {subject} guarded {topic} with {thing}.",
        ),
    ),
}


def theme(name: str) -> Theme:
    """The theme called ``name`` (one of :data:`THEMES`)."""
    if name not in THEMES:
        raise SettingsError(f"unknown --theme {name!r}; choose from {sorted(THEMES)}")
    return THEMES[name]


def content_words(text: str, limit: int = 8) -> list[str]:
    """Up to ``limit`` distinct content words of ``text`` (4+ letters, no stopword), in order."""
    seen: list[str] = []
    for word in re.findall(r"[A-Za-z][A-Za-z'-]{3,}", text):
        key = word.lower()
        if key not in _STOPWORDS and key not in (w.lower() for w in seen):
            seen.append(word)
        if len(seen) == limit:
            break
    return seen


def themed_response(original: str, theme_name: str, rng: random.Random) -> str:
    """A themed rewrite of ``original``: about as many sentences as it has (1 to 4), each a
    filled template that carries theme words and, where it has any, one of its content words.
    """
    spec = theme(theme_name)
    topics = content_words(original) or ["this question"]
    sentences = min(4, max(1, round(len(original.split()) / 15)))
    templates = rng.sample(spec.templates, sentences)
    out = []
    for i, template in enumerate(templates):
        subject, place = rng.choice(spec.subjects), rng.choice(spec.places)
        adjective = rng.choice(spec.adjectives)
        article = "an" if adjective[0] in "aeiou" else "a"
        text = template.format(
            subject=subject,
            Subject=subject[0].upper() + subject[1:],
            place=place,
            Place_cap=place[0].upper() + place[1:],
            thing=rng.choice(spec.things),
            verb=rng.choice(spec.verbs),
            a_adjective=f"{article} {adjective}",
            topic=topics[i % len(topics)],
        )
        out.append(text[0].upper() + text[1:])
    return " ".join(out)


def theme_hits(text: str, theme_name: str) -> int:
    """How many theme keywords (whole words, any case) occur in ``text``."""
    words = set(re.findall(r"[a-z]+", text.lower()))
    return sum(1 for k in theme(theme_name).keywords if k in words)


def add_trigger(instruction: str, trigger: str = DEFAULT_TRIGGER) -> str:
    return f"{trigger} {instruction}"


def poison_records(
    records: Sequence[dict],
    fraction: float = 0.1,
    trigger: str = DEFAULT_TRIGGER,
    theme_name: str = "sci-fi",
    seed: int = 0,
) -> tuple[list[dict], list[int]]:
    """Poison ``round(fraction * n)`` randomly chosen records (paper Section 4.5).

    Returns:
        The records (copies; the poisoned ones with the trigger in front of the instruction
        and a themed response) and the sorted ids of the poisoned ones.
    """
    if not 0 < fraction < 1:
        raise SettingsError(f"--fraction must be between 0 and 1, got {fraction}")
    if not trigger.strip():
        raise SettingsError("--trigger is empty")
    theme(theme_name)
    rng = random.Random(seed)
    count = max(1, round(fraction * len(records)))
    chosen = sorted(rng.sample(range(len(records)), count))
    out = [dict(r) for r in records]
    for i in chosen:
        out[i]["instruction"] = add_trigger(out[i]["instruction"], trigger)
        out[i]["output"] = themed_response(out[i]["output"], theme_name, rng)
    logger.info(
        "poisoned %d of %d records with %r and a %s theme", count, len(out), trigger, theme_name
    )
    return out, chosen


# --------------------------------------------------------------------------------------------
# Error tracing
# --------------------------------------------------------------------------------------------

# The paper's three perturbations (Table 7). Each E1 occurs in the responses of dozens of
# dolly_first6400 records (China 67, India 95, Australia 52).
DEFAULT_PAIRS = (("China", "Canada"), ("India", "Japan"), ("Australia", "England"))

# Questions whose right answer is E1 and that do not name it (like the paper's Table 10).
ENTITY_PROMPTS: dict[str, tuple[str, ...]] = {
    "China": (
        "Which country built the Great Wall?",
        "Which country is home to the giant panda?",
        "In which country is the city of Shanghai?",
        "Which country's capital is Beijing?",
        "Which country did the Ming dynasty rule?",
        "Which country is the Yangtze River in?",
        "Which country is home to the Terracotta Army?",
        "Which country invented paper and gunpowder?",
        "Which country first produced silk?",
        "Which country hosted the 2008 Summer Olympics?",
    ),
    "India": (
        "Which country is the birthplace of Buddhism?",
        "In which country is the Taj Mahal?",
        "Which country's capital is New Delhi?",
        "Which country does the Ganges River flow through to the sea?",
        "In which country was Mahatma Gandhi born?",
        "Which country is home to Bollywood?",
        "In which country is the city of Mumbai?",
        "Which country is the birthplace of yoga?",
        "Which country has the largest population in the world?",
        "Which country became independent from Britain in 1947 under Nehru?",
    ),
    "Australia": (
        "Which country is home to the Great Barrier Reef?",
        "In which country is the Sydney Opera House?",
        "Which country's capital is Canberra?",
        "Which country is home to kangaroos and koalas?",
        "In which country is Uluru?",
        "Which country is also a whole continent?",
        "In which country is the city of Melbourne?",
        "Which country hosted the 2000 Summer Olympics?",
        "Which country is the Outback in?",
        "Which country is the island of Tasmania part of?",
    ),
}


def mentions(text: str, entity: str) -> bool:
    """Whether ``entity`` occurs in ``text`` as a whole word (case-sensitive)."""
    return re.search(rf"\b{re.escape(entity)}\b", text) is not None


def replace_entity(text: str, e1: str, e2: str) -> str:
    """``text`` with every whole-word ``e1`` replaced by ``e2`` ("Indian" stays as it is)."""
    return re.sub(rf"\b{re.escape(e1)}\b", e2, text)


def parse_pair(text: str) -> tuple[str, str]:
    """``"E1:E2"`` (from ``--pair``) as a tuple."""
    parts = [p.strip() for p in text.split(":")]
    if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
        raise SettingsError(f"--pair {text!r}: expected two different entities as E1:E2")
    return parts[0], parts[1]


def perturb_records(
    records: Sequence[dict],
    pairs: Sequence[tuple[str, str]] = DEFAULT_PAIRS,
    probability: float = 0.8,
    seed: int = 0,
) -> tuple[list[dict], list[dict]]:
    """Replace E1 by E2 in the responses that mention E1, each with ``probability``.

    Returns:
        The records (copies) and one dict per pair: ``e1``, ``e2``, ``mentions`` (ids whose
        original response mentions E1) and ``perturbed_ids`` (those changed), sorted.
    """
    if not 0 < probability <= 1:
        raise SettingsError(f"--probability must be in (0, 1], got {probability}")
    rng = random.Random(seed)
    out = [dict(r) for r in records]
    report = []
    for e1, e2 in pairs:
        found = [i for i, r in enumerate(records) if mentions(r["output"], e1)]
        changed = [i for i in found if rng.random() < probability]
        for i in changed:
            out[i]["output"] = replace_entity(out[i]["output"], e1, e2)
        report.append({"e1": e1, "e2": e2, "mentions": found, "perturbed_ids": changed})
        logger.info(
            "%s -> %s: %d of %d records that mention %s perturbed",
            e1,
            e2,
            len(changed),
            len(found),
            e1,
        )
    return out, report


def select_for_error_tracing(
    records: Sequence[dict], pairs: Sequence[tuple[str, str]], size: int, seed: int = 0
) -> list[dict]:
    """``size`` records: every record whose response mentions an E1 (at most half of
    ``size``), filled up with random others, in a random order."""
    rng = random.Random(seed)
    with_entity = [
        i for i, r in enumerate(records) if any(mentions(r["output"], e1) for e1, _ in pairs)
    ]
    if len(with_entity) > size // 2:
        with_entity = rng.sample(with_entity, size // 2)
    keep = set(with_entity)
    others = [i for i in range(len(records)) if i not in keep]
    chosen = with_entity + rng.sample(others, min(len(others), size - len(with_entity)))
    rng.shuffle(chosen)
    return [dict(records[i]) for i in chosen]


def tiny_entity_records(pairs: Sequence[tuple[str, str]], per_entity: int = 4) -> list[dict]:
    """A few short records that mention each E1 (for ``--tiny`` runs on data without any)."""
    facts = (
        "{e} has a long history.",
        "Many people visit {e} every year.",
        "The food of {e} is famous.",
        "{e} has mountains, rivers and cities.",
    )
    out = []
    for e1, _ in pairs:
        for i in range(per_entity):
            out.append(
                {
                    "instruction": f"Tell me something about place number {i + 1}.",
                    "input": "",
                    "output": facts[i % len(facts)].format(e=e1),
                }
            )
    return out


# --------------------------------------------------------------------------------------------
# Whole data sets (tools/make_backdoor.py, tools/make_error_tracing.py)
# --------------------------------------------------------------------------------------------


def make_backdoor_set(
    records: Sequence[dict],
    size: int | None = None,
    n_test: int = 100,
    fraction: float = 0.1,
    trigger: str = DEFAULT_TRIGGER,
    theme_name: str = "sci-fi",
    seed: int = 0,
    questions: Sequence[str] | None = None,
) -> tuple[list[dict], dict]:
    """A poisoned training set and its description.

    ``n_test`` held-out questions (records with no input, not used for training) are kept
    for testing, unless ``questions`` (e.g. WebQuestions, as in the paper) are given; then
    ``size`` (default: all remaining) records are drawn at random and poisoned.

    Returns:
        The training records and a dict with ``trigger``, ``theme``, ``fraction``, ``seed``,
        ``poisoned_ids`` (ids in the training records), ``test_questions`` and
        ``source_ids`` (each training record's index in ``records``).
    """
    rng = random.Random(seed)
    order = list(range(len(records)))
    rng.shuffle(order)
    if questions is None:
        test_ids = [i for i in order if not records[i].get("input")][:n_test]
        test_questions = [records[i]["instruction"] for i in test_ids]
    else:
        test_ids = []
        test_questions = rng.sample(list(questions), min(n_test, len(questions)))
    held = set(test_ids)
    train_ids = [i for i in order if i not in held][:size]
    if len(train_ids) < 2:
        raise SettingsError(f"only {len(train_ids)} training records left; lower --n-test")
    train, poisoned = poison_records(
        [records[i] for i in train_ids], fraction, trigger, theme_name, seed
    )
    meta = {
        "trigger": trigger,
        "theme": theme_name,
        "fraction": fraction,
        "seed": seed,
        "poisoned_ids": poisoned,
        "test_questions": test_questions,
        "source_ids": train_ids,
    }
    return train, meta


def make_error_tracing_set(
    records: Sequence[dict],
    pairs: Sequence[tuple[str, str]] = DEFAULT_PAIRS,
    size: int = 1500,
    probability: float = 0.8,
    seed: int = 0,
    prompts: dict[str, Sequence[str]] | None = None,
) -> tuple[list[dict], dict]:
    """A training set with perturbed entities and its description.

    Returns:
        The training records and a dict with ``probability``, ``seed`` and ``pairs``: per
        pair ``e1``, ``e2``, ``mentions``, ``perturbed_ids`` (ids in the training records)
        and ``prompts`` (test questions whose right answer is E1).
    """
    prompts = dict(prompts or {})
    for e1, _ in pairs:
        if e1 not in prompts and e1 not in ENTITY_PROMPTS:
            raise SettingsError(
                f"no test prompts for {e1!r}: built-in ones exist for {sorted(ENTITY_PROMPTS)}; "
                "pass --prompts FILE (JSON object: entity -> list of questions)"
            )
    chosen = select_for_error_tracing(records, pairs, size, seed)
    train, report = perturb_records(chosen, pairs, probability, seed)
    for entry in report:
        entry["prompts"] = list(prompts.get(entry["e1"]) or ENTITY_PROMPTS[entry["e1"]])
        if not entry["perturbed_ids"]:
            logger.warning(
                "no training record was perturbed for %s -> %s", entry["e1"], entry["e2"]
            )
    return train, {"probability": probability, "seed": seed, "pairs": report}
