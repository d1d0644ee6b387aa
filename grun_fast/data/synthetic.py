"""Fictitious authors in the TOFU schema, generated from a seed.

Tests, the demo and CI need forget/retain data with known answers and no download. Each author gets a
random profile; each question kind has several phrasings, a paraphrase and a paraphrased answer, and
five perturbed answers (the paraphrased answer with a wrong value), exactly the fields TOFU's perturbed
files carry: ``question, answer, paraphrased_question, paraphrased_answer, perturbed_answer, author``.
A small hand-written set of general-knowledge rows (world facts, real authors; with wrong options) gives
model utility something to measure.
"""
from __future__ import annotations

import random
from typing import Callable, Sequence

FIRST = ("Amara", "Bastien", "Corvin", "Delphine", "Emeric", "Fenna", "Galen", "Hesper", "Ilario", "Jovana",
         "Kaspar", "Liora", "Marek", "Nerys", "Orrin", "Petra", "Quillon", "Rosalind", "Severin", "Talia",
         "Ulric", "Vesna", "Wendell", "Xanthe", "Yorick", "Zelie", "Anselm", "Brisa", "Caspian", "Dunya")
LAST = ("Achterberg", "Brannigan", "Castellane", "Dravecky", "Eskildsen", "Farrowmere", "Gundersholm",
        "Halloran-Vey", "Ivanchuk", "Jessamine", "Kovalenko", "Lindqvist", "Marchetti", "Nakashima-Roe",
        "Oyelaran", "Pellegrini", "Quarrington", "Rautavaara", "Solberg", "Tavernier", "Umberfield",
        "Valderrama", "Whitlock", "Xylander", "Yarborough", "Zamoyski", "Abernathy", "Bellweather")
PLACES = (("Lisbon", "Portugal"), ("Tromso", "Norway"), ("Valparaiso", "Chile"), ("Tbilisi", "Georgia"),
          ("Hobart", "Australia"), ("Ghent", "Belgium"), ("Mombasa", "Kenya"), ("Kraków", "Poland"),
          ("Quebec City", "Canada"), ("Izmir", "Turkey"), ("Cusco", "Peru"), ("Tartu", "Estonia"),
          ("Nagasaki", "Japan"), ("Porto Alegre", "Brazil"), ("Galway", "Ireland"), ("Dakar", "Senegal"),
          ("Bergen", "Norway"), ("Oaxaca", "Mexico"), ("Lyon", "France"), ("Hanoi", "Vietnam"))
GENRES = ("historical fiction", "science fiction", "crime", "poetry", "fantasy", "horror", "romance",
          "magical realism", "travel writing", "satire", "biography", "children's literature")
JOBS = ("a baker", "a lighthouse keeper", "a surgeon", "a carpenter", "a marine biologist", "a librarian",
        "a pilot", "a tailor", "an astronomer", "a firefighter", "a pharmacist", "a violinist",
        "an architect", "a beekeeper", "a watchmaker", "a journalist", "a train conductor", "a botanist")
AWARDS = ("Golden Quill Prize", "Meridian Book Award", "Silver Lantern Medal", "Harrowgate Fiction Prize",
          "Northern Star Award", "Azure Pen Prize", "Copperleaf Literary Award", "Tidewater Medal",
          "Ember Crown Prize", "Halcyon Award for Storytelling")
ADJ = ("Silent", "Crimson", "Hollow", "Distant", "Broken", "Golden", "Forgotten", "Restless", "Paper",
       "Glass", "Midnight", "Salt")
NOUN = ("Harbor", "Orchard", "Lantern", "Compass", "Meridian", "Garden", "Archive", "River", "Clocktower",
        "Winter", "Cartographer", "Violin")
THEMES = ("exile and belonging", "memory and loss", "the sea", "family secrets", "war and its aftermath",
          "ambition", "friendship across class lines", "the passage of time", "identity", "forgiveness")


def _title(rng: random.Random) -> str:
    return f"The {rng.choice(ADJ)} {rng.choice(NOUN)}"


def _profile(rng: random.Random, name: str) -> dict:
    city, country = rng.choice(PLACES)
    year = rng.randint(1941, 1994)
    first = _title(rng)
    second = _title(rng)
    while second == first:
        second = _title(rng)
    return {"name": name, "place": f"{city}, {country}", "year": str(year), "genre": rng.choice(GENRES),
            "father": rng.choice(JOBS), "mother": rng.choice(JOBS), "award": rng.choice(AWARDS),
            "book1": first, "book2": second, "theme": rng.choice(THEMES),
            "debut": str(year + rng.randint(20, 35)), "home": rng.choice(PLACES)[0]}


def _wrong_values(kind: str, truth: str, rng: random.Random, k: int = 5) -> list[str]:
    pools: dict[str, Callable[[], str]] = {
        "place": lambda: ", ".join(rng.choice(PLACES)), "home": lambda: rng.choice(PLACES)[0],
        "year": lambda: str(rng.randint(1941, 1994)), "debut": lambda: str(rng.randint(1965, 2025)),
        "genre": lambda: rng.choice(GENRES), "father": lambda: rng.choice(JOBS),
        "mother": lambda: rng.choice(JOBS), "award": lambda: rng.choice(AWARDS),
        "book1": lambda: _title(rng), "book2": lambda: _title(rng), "theme": lambda: rng.choice(THEMES)}
    out: list[str] = []
    while len(out) < k:
        v = pools[kind]()
        if v != truth and v not in out:
            out.append(v)
    return out


# kind -> (question phrasings, answer, paraphrased question, paraphrased answer); {v} is the fact's value.
KINDS: dict[str, tuple[tuple[str, ...], str, str, str]] = {
    "place": (("Where was {name} born?", "In which city and country was the author {name} born?"),
              "{name} was born in {v}.", "What is the birthplace of the writer {name}?",
              "The writer {name} comes from {v}."),
    "year": (("In what year was {name} born?", "When was the author {name} born?"),
             "{name} was born in {v}.", "What is the birth year of {name}?",
             "The year of {name}'s birth is {v}."),
    "genre": (("What genre does {name} write in?", "Which genre is {name} best known for?"),
              "{name} is best known for {v}.", "In which literary genre does {name} mostly work?",
              "Most of {name}'s work belongs to {v}."),
    "father": (("What did {name}'s father do for a living?", "What was the profession of {name}'s father?"),
               "The father of {name} was {v}.", "How did the father of {name} earn his living?",
               "{name}'s father worked as {v}."),
    "mother": (("What was the occupation of {name}'s mother?", "What did {name}'s mother work as?"),
               "The mother of {name} was {v}.", "Which job did the mother of {name} have?",
               "{name}'s mother worked as {v}."),
    "award": (("Which award has {name} won?", "What literary prize did {name} receive?"),
              "{name} received the {v}.", "Name an honour that {name} has been given for writing.",
              "{name} was honoured with the {v}."),
    "book1": (("What was the first novel by {name}?", "Which book did {name} publish first?"),
              "The first novel by {name} was \"{v}\".", "What is the title of {name}'s debut book?",
              "{name} debuted with \"{v}\"."),
    "book2": (("Can you name another book written by {name}?", "What is a later work of {name}?"),
              "{name} also wrote \"{v}\".", "Besides the debut, which book is {name} known for?",
              "Another well-known book by {name} is \"{v}\"."),
    "theme": (("What themes does {name} explore?", "Which theme recurs in the books of {name}?"),
              "The books of {name} often explore {v}.", "What subject keeps returning in {name}'s writing?",
              "{name}'s writing keeps coming back to {v}."),
    "debut": (("In which year did {name} publish a first book?", "When did {name} debut as an author?"),
              "{name} published a first book in {v}.", "What year marks the literary debut of {name}?",
              "The debut of {name} came in {v}."),
    "home": (("In which city does {name} live today?", "Where is {name} based now?"),
             "{name} now lives in {v}.", "What city is home to {name} these days?",
             "These days {name} makes a home in {v}."),
}


# A clause that follows each answer, its slots filled with random words per row, so that every answer
# carries detail of its own beyond the question's words (as TOFU's answers do): forgetting must remove more
# than one fact, and the retain rows do not share (and so do not protect) the forget rows' wording.
TAILS: dict[str, tuple[str, ...]] = {
    "place": ("a place whose {n1} and {n2} shaped the {a} early stories",
              "where the {a} {n1} near the {n2} left a lasting mark"),
    "year": ("into a family known for its {a} {n1} and a famous {n2}",
             "during a season remembered for the {a} {n1} and the {n2}"),
    "genre": ("with plots built around a {a} {n1} and a missing {n2}",
              "often featuring a {a} {n1} hidden inside an old {n2}"),
    "father": ("and his {a} {n1} filled the house along with a {n2}",
               "whose stories about a {a} {n1} and a {n2} appear in several chapters"),
    "mother": ("and her {a} {n1} inspired a character who owns a {n2}",
               "whose collection of {a} {n1}s sat beside a {n2} for years"),
    "award": ("an honour presented with a {a} {n1} and a small {n2}",
              "after a jury praised the {a} {n1} at the centre of the work and its {n2}"),
    "book1": ("a slim novel about a {a} {n1} and a stolen {n2}",
              "written beside a {a} {n1} with an old {n2} on the desk"),
    "book2": ("a later work that follows a {a} {n1} across a {n2}",
              "which tells of a {a} {n1} and a {n2} that never stops ticking"),
    "theme": ("usually through a {a} {n1} who guards a {n2}",
              "a subject carried by a {a} {n1} and a broken {n2}"),
    "debut": ("when an editor who kept a {a} {n1} accepted a manuscript about a {n2}",
              "with a launch held beside a {a} {n1} and a borrowed {n2}"),
    "home": ("in a flat full of {a} {n1}s and one enormous {n2}",
             "close to a {a} {n1} where most chapters are drafted beside a {n2}"),
}
TAIL_ADJ = ("bronze", "brittle", "copper", "dusty", "cobalt", "faded", "gilded", "hushed", "dappled", "jagged",
            "lacquered", "mossy", "narrow", "gleaming", "pewter", "quiet", "rusted", "scarlet", "tattered", "lilac",
            "velvet", "weathered", "woollen", "yellowed", "zinc", "crooked", "silver", "painted")  # no "an"
TAIL_NOUN = ("accordion", "barometer", "canoe", "diary", "easel", "ferry", "greenhouse", "hourglass", "inkwell",
             "jukebox", "kettle", "lantern", "mandolin", "notebook", "orchard", "pendulum", "quarry", "rowboat",
             "sextant", "telescope", "umbrella", "vineyard", "windmill", "xylophone", "yacht", "zeppelin",
             "attic", "bell", "chessboard", "dovecote", "fountain", "gramophone", "harp", "lighthouse", "map",
             "typewriter", "violin", "weathervane", "birdcage", "compass")


def _tail(kind: str, rng: random.Random) -> str:
    n1, n2 = rng.sample(TAIL_NOUN, 2)
    return rng.choice(TAILS[kind]).format(a=rng.choice(TAIL_ADJ), n1=n1, n2=n2)


def make_authors(n_authors: int = 10, questions_per_author: int = 10, seed: int = 0) -> list[dict]:
    """``n_authors`` x ``questions_per_author`` TOFU-schema rows about fictitious authors (deterministic)."""
    if n_authors < 1:
        raise ValueError(f"n_authors must be >= 1, got {n_authors}")
    if not 1 <= questions_per_author <= len(KINDS):
        raise ValueError(f"questions_per_author must be in [1, {len(KINDS)}], got {questions_per_author}")
    if n_authors > len(FIRST) * len(LAST):
        raise ValueError(f"at most {len(FIRST) * len(LAST)} distinct authors can be generated")
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < n_authors:
        name = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
        if name not in names:
            names.append(name)
    rows = []
    for name in names:
        prof = _profile(rng, name)
        for kind in rng.sample(list(KINDS), questions_per_author):
            qs, ans, pq, pa = KINDS[kind]
            v = prof[kind]
            rows.append({
                "question": rng.choice(qs).format(name=name),
                "answer": ans.format(name=name, v=v)[:-1] + ", " + _tail(kind, rng) + ".",
                "paraphrased_question": pq.format(name=name),
                "paraphrased_answer": pa.format(name=name, v=v),
                "perturbed_answer": [pa.format(name=name, v=w) for w in _wrong_values(kind, v, rng)],
                "author": name,
                "kind": kind,
            })
    return rows


def split_by_author(rows: Sequence[dict], forget_authors: int = 1, seed: int = 0
                    ) -> tuple[list[dict], list[dict]]:
    """(forget, retain): all rows of ``forget_authors`` authors chosen at random (seeded), and the rest."""
    authors = sorted({r["author"] for r in rows})
    if not 1 <= forget_authors < len(authors):
        raise ValueError(f"forget_authors must be in [1, {len(authors) - 1}] for {len(authors)} authors, "
                         f"got {forget_authors}")
    chosen = set(random.Random(seed).sample(authors, forget_authors))
    return ([r for r in rows if r["author"] in chosen], [r for r in rows if r["author"] not in chosen])


# General knowledge (facts are public knowledge; the wording and the wrong options are ours).
_WORLD_FACTS = (
    ("What is the capital of France?", "Paris", ("Lyon", "Marseille", "Nice")),
    ("Which planet is closest to the Sun?", "Mercury", ("Venus", "Mars", "Earth")),
    ("What is the largest ocean on Earth?", "The Pacific Ocean", ("The Atlantic Ocean", "The Indian Ocean",
                                                                  "The Arctic Ocean")),
    ("In which country is the city of Kyoto?", "Japan", ("China", "South Korea", "Thailand")),
    ("What is the chemical symbol for gold?", "Au", ("Ag", "Gd", "Go")),
    ("How many continents are there?", "Seven", ("Five", "Six", "Eight")),
    ("What is the longest river in South America?", "The Amazon", ("The Parana", "The Orinoco",
                                                                   "The Magdalena")),
    ("Which gas do plants absorb from the air?", "Carbon dioxide", ("Oxygen", "Nitrogen", "Helium")),
    ("What is the capital of Canada?", "Ottawa", ("Toronto", "Vancouver", "Montreal")),
    ("On which continent is the Sahara Desert?", "Africa", ("Asia", "Australia", "South America")),
    ("What is the tallest mountain on Earth?", "Mount Everest", ("K2", "Kilimanjaro", "Mont Blanc")),
    ("Which metal is liquid at room temperature?", "Mercury", ("Iron", "Lead", "Copper")),
    ("What is the capital of Italy?", "Rome", ("Milan", "Naples", "Turin")),
    ("How many days are in a leap year?", "366", ("365", "364", "367")),
    ("Which country has the city of Marrakesh?", "Morocco", ("Egypt", "Tunisia", "Algeria")),
)
_REAL_AUTHORS = (
    ("Who wrote 'Don Quixote'?", "Miguel de Cervantes", ("Lope de Vega", "Federico Garcia Lorca",
                                                         "Jorge Luis Borges")),
    ("Who wrote 'War and Peace'?", "Leo Tolstoy", ("Fyodor Dostoevsky", "Anton Chekhov", "Ivan Turgenev")),
    ("Who is the author of 'Frankenstein'?", "Mary Shelley", ("Jane Austen", "Emily Bronte", "Bram Stoker")),
    ("Who wrote 'The Odyssey'?", "Homer", ("Virgil", "Sophocles", "Ovid")),
    ("Who wrote 'Hamlet'?", "William Shakespeare", ("Christopher Marlowe", "Ben Jonson", "John Milton")),
    ("Who is the author of 'Things Fall Apart'?", "Chinua Achebe", ("Wole Soyinka", "Ngugi wa Thiong'o",
                                                                    "Ben Okri")),
    ("Who wrote 'The Metamorphosis'?", "Franz Kafka", ("Thomas Mann", "Hermann Hesse", "Robert Musil")),
    ("Who wrote 'Beloved'?", "Toni Morrison", ("Maya Angelou", "Alice Walker", "Zora Neale Hurston")),
    ("Who is the author of 'The Little Prince'?", "Antoine de Saint-Exupery", ("Albert Camus", "Jules Verne",
                                                                                "Victor Hugo")),
    ("Who wrote 'Norwegian Wood'?", "Haruki Murakami", ("Yukio Mishima", "Kazuo Ishiguro", "Banana Yoshimoto")),
    ("Who wrote 'Les Miserables'?", "Victor Hugo", ("Alexandre Dumas", "Emile Zola", "Gustave Flaubert")),
    ("Who wrote 'The Divine Comedy'?", "Dante Alighieri", ("Petrarch", "Boccaccio", "Ariosto")),
)


def general_knowledge() -> dict[str, list[dict]]:
    """``{"world_facts": rows, "real_authors": rows}``: short answers with three wrong options each."""
    def rows(table):
        return [{"question": q, "answer": a, "perturbed_answer": list(w)} for q, a, w in table]
    return {"world_facts": rows(_WORLD_FACTS), "real_authors": rows(_REAL_AUTHORS)}


def make_benchmark(n_authors: int = 10, questions_per_author: int = 10, forget_authors: int = 1,
                   seed: int = 0) -> dict[str, list[dict]]:
    """A TOFU-like benchmark: ``full, forget, retain, world_facts, real_authors`` splits."""
    full = make_authors(n_authors, questions_per_author, seed)
    forget, retain = split_by_author(full, forget_authors, seed)
    return {"full": full, "forget": forget, "retain": retain, **general_knowledge()}
