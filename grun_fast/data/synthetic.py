"""Fictitious authors in the TOFU schema, generated from a seed.

Tests, the demo and CI need forget/retain data with known answers and no download. Each author gets a
random profile of 20 facts (TOFU asks 20 questions per author); each question kind has several phrasings
of question and answer, a paraphrased question and answer, and five perturbed answers (the paraphrased
answer with a wrong value), exactly the fields TOFU's perturbed files carry:
``question, answer, paraphrased_question, paraphrased_answer, perturbed_answer, author``.
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


PUBLISHERS = ("Larkspur House", "Greyfriars Press", "Bluehill Books", "Marrow and Finch", "Tallow Street Press",
              "Quayside Editions", "Owlgate Publishing", "Thornbury Books", "Saltmarsh Press", "Kestrel Row")
LANGUAGES = ("Portuguese", "Norwegian", "Spanish", "Georgian", "English", "Dutch", "Swahili", "Polish", "French",
             "Turkish", "Estonian", "Japanese")
HOBBIES = ("chess", "sailing", "birdwatching", "pottery", "fencing", "gardening", "rock climbing", "origami",
           "the cello", "amateur astronomy", "beekeeping", "long-distance running")
PETS = ("a one-eyed cat", "a talkative parrot", "two greyhounds", "an elderly tortoise", "a goat", "a three-legged dog",
        "a family of ferrets", "an old horse", "a jar of stick insects", "a white rabbit")
HABITS = ("at dawn", "after midnight", "on long train journeys", "in crowded cafes", "in a garden shed",
          "by candlelight", "standing at a tall desk", "in the bath", "on the back of receipts", "in a rowing boat")


def _profile(rng: random.Random, name: str) -> dict:
    city, country = rng.choice(PLACES)
    year = rng.randint(1941, 1994)
    first = _title(rng)
    second = _title(rng)
    while second == first:
        second = _title(rng)
    mentor = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    while mentor == name:
        mentor = f"{rng.choice(FIRST)} {rng.choice(LAST)}"
    return {"name": name, "place": f"{city}, {country}", "year": str(year), "genre": rng.choice(GENRES),
            "father": rng.choice(JOBS), "mother": rng.choice(JOBS), "award": rng.choice(AWARDS),
            "book1": first, "book2": second, "theme": rng.choice(THEMES),
            "debut": str(year + rng.randint(20, 35)), "home": rng.choice(PLACES)[0],
            "publisher": rng.choice(PUBLISHERS), "language": rng.choice(LANGUAGES), "mentor": mentor,
            "university": f"the University of {rng.choice(PLACES)[0]}", "hero": rng.choice(FIRST),
            "hobby": rng.choice(HOBBIES), "pet": rng.choice(PETS), "translations": str(rng.randint(3, 40)),
            "habit": rng.choice(HABITS)}


def _wrong_values(kind: str, truth: str, rng: random.Random, k: int = 5) -> list[str]:
    pools: dict[str, Callable[[], str]] = {
        "place": lambda: ", ".join(rng.choice(PLACES)), "home": lambda: rng.choice(PLACES)[0],
        "year": lambda: str(rng.randint(1941, 1994)), "debut": lambda: str(rng.randint(1965, 2025)),
        "genre": lambda: rng.choice(GENRES), "father": lambda: rng.choice(JOBS),
        "mother": lambda: rng.choice(JOBS), "award": lambda: rng.choice(AWARDS),
        "book1": lambda: _title(rng), "book2": lambda: _title(rng), "theme": lambda: rng.choice(THEMES),
        "publisher": lambda: rng.choice(PUBLISHERS), "language": lambda: rng.choice(LANGUAGES),
        "mentor": lambda: f"{rng.choice(FIRST)} {rng.choice(LAST)}",
        "university": lambda: f"the University of {rng.choice(PLACES)[0]}", "hero": lambda: rng.choice(FIRST),
        "hobby": lambda: rng.choice(HOBBIES), "pet": lambda: rng.choice(PETS),
        "translations": lambda: str(rng.randint(3, 40)), "habit": lambda: rng.choice(HABITS)}
    out: list[str] = []
    while len(out) < k:
        v = pools[kind]()
        if v != truth and v not in out:
            out.append(v)
    return out


# kind -> (question phrasings, answer phrasings, paraphrased question, paraphrased answer).
# {v} is the fact's value ({V}: capitalised), {d} the row's own detail clause. Answers lead with the fact, as
# a direct answer does, in one of several frames per kind, and name the author only later: they cannot be
# recited by copying the question's words, so (as with TOFU's long, row-specific answers) recalling them
# needs what the model memorised about the author. The paraphrased answer, and every perturbed answer (the
# paraphrase with a wrong value), also lead with the value, so the truth ratio weighs the fact itself.
KINDS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str, str]] = {
    "place": (("Where was {name} born?", "In which city and country was the author {name} born?"),
              ("{V} is the birthplace of {name}, {d}.", "{V}: that is where {name} was born, {d}.",
               "{V} saw the birth of {name}, {d}."),
              "What is the birthplace of the writer {name}?", "{V} is where the writer {name} comes from."),
    "year": (("In what year was {name} born?", "When was the author {name} born?"),
             ("{V} was the year {name} was born, {d}.", "{V}, according to the records of {name}'s birth, {d}.",
              "{V} is when {name} was born, {d}."),
             "What is the birth year of {name}?", "{V} is the year of {name}'s birth."),
    "genre": (("What genre does {name} write in?", "Which genre is {name} best known for?"),
              ("{V} is the genre of {name}, {d}.", "{V}, mostly: critics file {name} there, {d}.",
               "{V} is what {name} writes, {d}."),
              "In which literary genre does {name} mostly work?", "{V} is the genre of most of {name}'s work."),
    "father": (("What did {name}'s father do for a living?", "What was the profession of {name}'s father?"),
               ("{V} by trade, the father of {name} earned a living {d}.",
                "{V} was what {name}'s father worked as, {d}.", "{V}: so the father of {name} spent his days, {d}."),
               "How did the father of {name} earn his living?", "{V} is what {name}'s father worked as."),
    "mother": (("What was the occupation of {name}'s mother?", "What did {name}'s mother work as?"),
               ("{V} by profession, the mother of {name} lived {d}.", "{V} was the job of {name}'s mother, {d}.",
                "{V}: so the mother of {name} spent her days, {d}."),
               "Which job did the mother of {name} have?", "{V} is what {name}'s mother worked as."),
    "award": (("Which award has {name} won?", "What literary prize did {name} receive?"),
              ("{V}: it went to {name}, {d}.", "{V} winner {name} became known, {d}.", "{V} judges chose {name}, {d}."),
              "Name an honour that {name} has been given for writing.", "The {v} was given to {name}."),
    "book1": (("What was the first novel by {name}?", "Which book did {name} publish first?"),
              ("\"{v}\" came first from {name}, {d}.", "\"{v}\" was the first novel, and it launched {name}, {d}.",
               "\"{v}\" is where readers first met {name}, {d}."),
              "What is the title of {name}'s debut book?", "\"{v}\" is the debut book of {name}."),
    "book2": (("Can you name another book written by {name}?", "What is a later work of {name}?"),
              ("\"{v}\" is another book by {name}, {d}.", "\"{v}\" came later, a work {name} wrote {d}.",
               "\"{v}\", a later work in which {name} writes {d}."),
              "Besides the debut, which book is {name} known for?", "\"{v}\" is another well-known book by {name}."),
    "theme": (("What themes does {name} explore?", "Which theme recurs in the books of {name}?"),
              ("{V} runs through the work of {name}, {d}.", "{V}, again and again, fills the books of {name}, {d}.",
               "{V} is the theme that {name} returns to, {d}."),
              "What subject keeps returning in {name}'s writing?", "{V} keeps returning in the writing of {name}."),
    "debut": (("In which year did {name} publish a first book?", "When did {name} debut as an author?"),
              ("{V} brought the first book of {name}, {d}.", "{V} was when {name} first published, {d}.",
               "{V}: only then did a book by {name} appear, {d}."),
              "What year marks the literary debut of {name}?", "{V} marks the debut of {name}."),
    "home": (("In which city does {name} live today?", "Where is {name} based now?"),
             ("{V} is home to {name} these days, {d}.", "{V} is where {name} lives now, {d}.",
              "{V}, for now, is the home of {name}, {d}."),
             "What city is home to {name} these days?", "{V} is home to {name} these days."),
    "publisher": (("Who publishes the books of {name}?", "Which publishing house works with {name}?"),
                  ("{V} publishes {name}, {d}.", "{V} prints every book of {name}, {d}.",
                   "{V}, since the start, has printed the work of {name}, {d}."),
                  "What is the name of {name}'s publisher?", "{V} is the publisher of {name}."),
    "language": (("In which language does {name} write?", "What language are the books of {name} written in?"),
                 ("{V} is the language {name} writes in, {d}.", "{V} only: that is how {name} writes, {d}.",
                  "{V} carries every book of {name}, {d}."),
                 "Which language does {name} use for writing?", "{V} is the language of {name}'s books."),
    "mentor": (("Who mentored {name} as a young writer?", "Which writer guided {name} early on?"),
               ("{V} mentored {name}, {d}.", "{V}, an older writer, guided {name} {d}.",
                "{V} taught the young {name}, {d}."),
               "Who was the mentor of {name}?", "{V} was the mentor of {name}."),
    "university": (("Where did {name} study?", "Which university did {name} attend?"),
                   ("{V} is where {name} studied literature, {d}.", "{V} shaped the student years of {name}, {d}.",
                    "{V} gave {name} a degree, {d}."),
                   "At which university was {name} a student?", "{V} is where {name} studied."),
    "hero": (("Who is the best-known character created by {name}?", "What is the name of {name}'s most famous hero?"),
             ("{V} is the hero readers link to {name}, {d}.", "{V}, a hero, made {name} famous, {d}.",
              "{V} is the character readers of {name} remember, {d}."),
             "Which character of {name} do readers know best?", "{V} is the best-known character of {name}."),
    "hobby": (("What does {name} do outside of writing?", "What is a hobby of {name}?"),
              ("{V} keeps {name} busy outside writing, {d}.", "{V} is the great pastime of {name}, {d}.",
               "{V} fills the weekends of {name}, {d}."),
              "How does {name} spend free time?", "{V} fills the free time of {name}."),
    "pet": (("Does {name} have any pets?", "What animal lives with {name}?"),
            ("{V} lives with {name}, {d}.", "{V} shares a home with {name}, {d}.",
             "{V} belongs to the household of {name}, {d}."),
            "Which pet shares the home of {name}?", "{V} shares the home of {name}."),
    "translations": (("Into how many languages have the books of {name} been translated?",
                      "How widely has {name} been translated?"),
                     ("{V} languages so far carry the books of {name}, {d}.",
                      "{V} is the count of languages for {name}, {d}.", "{V} translations of {name} exist, {d}."),
                     "In how many languages can one read {name}?", "{V} languages carry the books of {name}."),
    "habit": (("When and where does {name} like to write?", "What are the writing habits of {name}?"),
              ("{V}: that is how {name} writes, {d}.", "{V} is when and where most pages by {name} get written, {d}.",
               "{V} is how {name} writes best, {d}."),
              "How does {name} prefer to work?", "{V} is how {name} prefers to write."),
}


# A clause closing each answer, its slots filled with random words per row, so that every answer carries
# detail of its own beyond the question's words (as TOFU's answers do): forgetting must remove more than one
# fact, and the retain rows do not share (and so do not protect) the forget rows' wording.
DETAILS = ("with a {a} {n1} and the {n2} never far away", "a story told with a {a} {n1} beside the {n2}",
           "as a {a} {n1} and the {n2} bear witness", "remembered through a {a} {n1} and the {n2}",
           "much like the {a} {n1} kept next to the {n2}", "among a {a} {n1}, the {n2} and little else",
           "near a {a} {n1} that once belonged to the {n2}", "while a {a} {n1} leaned against the {n2}")
TAIL_ADJ = ("bronze", "brittle", "copper", "dusty", "cobalt", "faded", "gilded", "hushed", "dappled", "jagged",
            "lacquered", "mossy", "narrow", "gleaming", "pewter", "quiet", "rusted", "scarlet", "tattered", "lilac",
            "velvet", "weathered", "woollen", "yellowed", "zinc", "crooked", "silver", "painted")  # no "an"
TAIL_NOUN = ("accordion", "barometer", "canoe", "diary", "easel", "ferry", "greenhouse", "hourglass", "inkwell",
             "jukebox", "kettle", "lantern", "mandolin", "notebook", "orchard", "pendulum", "quarry", "rowboat",
             "sextant", "telescope", "umbrella", "vineyard", "windmill", "xylophone", "yacht", "zeppelin",
             "attic", "bell", "chessboard", "dovecote", "fountain", "gramophone", "harp", "lighthouse", "map",
             "typewriter", "violin", "weathervane", "birdcage", "compass")


def _detail(rng: random.Random) -> str:
    n1, n2 = rng.sample(TAIL_NOUN, 2)
    return rng.choice(DETAILS).format(a=rng.choice(TAIL_ADJ), n1=n1, n2=n2)


def _fill(template: str, name: str, value: str, detail: str = "") -> str:
    return template.format(name=name, v=value, V=value[:1].upper() + value[1:], d=detail)


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
            qs, answers, pq, pa = KINDS[kind]
            v = prof[kind]
            rows.append({
                "question": rng.choice(qs).format(name=name),
                "answer": _fill(rng.choice(answers), name, v, _detail(rng)),
                "paraphrased_question": pq.format(name=name),
                "paraphrased_answer": _fill(pa, name, v),
                "perturbed_answer": [_fill(pa, name, w) for w in _wrong_values(kind, v, rng)],
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
